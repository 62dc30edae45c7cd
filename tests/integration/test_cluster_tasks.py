"""Tasks sent through the master's API: drain (health 503 at once, new connections refused after
the grace, requests in flight finish), resume, and reload."""

from __future__ import annotations

import threading
import time

import pytest

import harness
from cluster_harness import cluster, fetch, status_of  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

DRAIN_GRACE_S = 3.0


def test_drain_resume_and_reload_through_the_master(cluster, origins):
    cluster.start_master(harness.make_policy())
    slave = cluster.add_slave(args=["--drain-grace", f"{DRAIN_GRACE_S:g}"])
    cluster.wait_connected(slave.name)

    status, answer = cluster.send_task(slave.name, "drain")
    drained_at = time.monotonic()
    assert status == 200 and answer["ok"] is True and answer["task"] == "drain", answer
    health_status, health = slave.health()
    assert health_status == 503 and health["status"] == "draining", health

    # Within the grace, the balancer may still send a few clients: they are served.
    in_flight: dict[str, object] = {}
    if time.monotonic() - drained_at < DRAIN_GRACE_S - 1.0:
        assert status_of(slave, origins.url("/during-grace")) == 200

        def slow_request() -> None:
            in_flight["response"] = fetch(slave, origins.url(f"/slow?delay={DRAIN_GRACE_S:g}"), timeout=15)

        worker = threading.Thread(target=slow_request)
        worker.start()
    else:
        worker = None

    harness.wait_until(lambda: status_of(slave, origins.url("/after-grace")) == 503, DRAIN_GRACE_S + 3,
                       "new connections refused after the grace", interval=0.1)
    view = cluster.wait_view(slave.name, lambda e: e["draining"], 5, "draining shown")
    assert "draining" in view["warnings"]
    if worker is not None:
        worker.join(15)
        response = in_flight.get("response")
        assert response is not None and response.status == 200, "a request in flight was cut by the drain"

    status, answer = cluster.send_task(slave.name, "resume")
    assert status == 200 and answer["ok"] is True, answer
    slave.wait_health(200, 5)
    assert status_of(slave, origins.url("/after-resume")) == 200
    cluster.wait_view(slave.name, lambda e: not e["draining"] and "draining" not in e["warnings"], 5, "resumed")

    status, answer = cluster.send_task(slave.name, "reload")
    assert status == 200 and answer["ok"] is True, answer

    assert cluster.send_task(slave.name, "reboot")[0] == 422
    assert cluster.send_task("no-such-node", "drain")[0] == 404
