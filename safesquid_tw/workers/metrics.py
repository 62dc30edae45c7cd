"""/metrics for a node with workers: each worker's state, connections and policy version, and
the restarts. Requests, durations and bytes are already aggregated in the parent's counters
(every worker's access records pass through it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class WorkersCollector:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        workers = [pool.workers[slot] for slot in sorted(pool.workers)]
        up = GaugeMetricFamily("safesquid_worker_up", "1 while the worker process runs", labels=["slot"])
        conns = GaugeMetricFamily("safesquid_worker_connections", "Open client connections per worker",
                                  labels=["slot"])
        version = GaugeMetricFamily("safesquid_worker_policy_version", "Policy version the worker serves (0: none)",
                                    labels=["slot"])
        for worker in workers:
            slot = str(worker.slot)
            up.add_metric([slot], 0 if worker.state == "exited" else 1)
            conns.add_metric([slot], worker.connections)
            version.add_metric([slot], worker.policy_version or 0)
        yield up
        yield conns
        yield version
        yield GaugeMetricFamily("safesquid_worker_client_connections", "Open client connections, all workers",
                                value=pool.connections())
        yield CounterMetricFamily("safesquid_worker_restarts", "Workers restarted after they exited unexpectedly",
                                  value=pool.restarts)
