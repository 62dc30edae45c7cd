"""The node's side of `--workers N`: it binds the --listen sockets, hands them to N worker
processes, and stays the one node the cluster sees.

The parent binds each listener itself (so listening.json, port 0 and PROXY-protocol listeners
work as with one process), never accepts on it, and passes the socket to every worker as an
inherited file descriptor; each worker adopts it (reactor.adoptStreamPort). All workers then
accept from one kernel queue: a worker that dies loses nothing still queued, unlike separate
SO_REUSEPORT sockets whose queues die with their process.

Policy versions go to every worker as they are swapped in the store; workers acknowledge the
version they serve. Each worker writes its access records to its own durable spool; the node
ships every worker's sealed segments as its one shipping stream (workers/spools.py). The records
also come back over each worker's stdout for the node's one access.log and its counters. A worker that exits unexpectedly is restarted with
back-off and counted. `drain`/`resume`, SIGHUP and the graceful stop reach every worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.address import IPv6Address
from twisted.logger import Logger, LogLevel

import safesquid_tw
from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.config import NodeConfig
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.workers.policydelta import change_message, whole_message
from safesquid_tw.proxy.proxyheader import split_endpoint
from safesquid_tw.proxy.service import ProxyFactory, with_backlog
from safesquid_tw.workers.child import config_to_json, record_from_json
from safesquid_tw.workers.frames import FrameError, FrameReader, encode
from safesquid_tw.workers.limits import create_table

log = Logger()

LOG_LEVELS = {level.name: level for level in LogLevel.iterconstants()}
FIRST_FD = 3  # the inherited sockets' numbers in a worker: 3, 4, ...
BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker that died
BACKOFF_MAX = 10.0
STEADY_AFTER = 30.0  # a worker that ran this long starts its back-off over
STOP_BOUND = 30.0  # seconds a worker gets to finish at stop before it is killed


def cpu_count() -> int:
    """The CPUs this process may use (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _NeverAccepts(protocol.Factory):
    """The parent's own port object is never read from; only the workers accept."""

    noisy = False  # no "Starting factory" lines: the log says who serves the port

    def buildProtocol(self, addr):
        return None


class WorkerProcess(protocol.ProcessProtocol):
    """One worker as the parent sees it."""

    def __init__(self, pool: "WorkerPool", slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: int | None = None
        self.state = "starting"  # starting, running, draining, stopping, exited
        self.policy_version: int | None = None
        self.policy_error: str | None = None
        self.sent_digest: str | None = None  # the version last sent to it (policydelta.py)
        self.connections = 0
        self.requests = 0
        self.started_at = pool.reactor.seconds()
        self.ended = defer.Deferred()
        self._reader = FrameReader(self._message)
        self._err = b""
        self.greeted = False  # said hello: from then on it hears every message
        self.edge: dict[str, int] = {}  # its connections closed at the edge, by reason
        self.antivirus: dict | None = None  # its scanner's figures (icap/scanner.py stats)
        self.spool: dict | None = None  # its spool writer's stats (accesslog/spoolwriter.py)
        self._failures_seen: dict[str, int] = {}  # its upstream failure totals, by kind
        self.directory: dict | None = None  # its user directory figures (identity/watch.py)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.state not in ("exited",):
            try:
                self.transport.writeToChild(0, encode(message))
            except (OSError, KeyError):
                pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            try:
                self._reader.feed(data)
            except FrameError as e:
                log.error("worker {pid} sent a malformed frame ({why}): stopping it", pid=self.pid, why=str(e))
                self.transport.signalProcess("KILL")
        elif fd == 2:
            self._err += data
            *lines, self._err = self._err.split(b"\n")
            for line in lines:
                if line.strip():
                    self._log_line(line)

    def _log_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            level, text = LOG_LEVELS.get(event["level"], LogLevel.info), str(event["text"])
        except (ValueError, KeyError, TypeError):
            level, text = LogLevel.error, line.decode("utf-8", "replace")
        log.emit(level, "worker {pid}: {text}", pid=self.pid, text=text)

    def _message(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "rec":
            if isinstance(message.get("uf"), dict):
                self._upstream_failures(message["uf"])
            if "l" in message:
                self.pool.line_from_worker(message["l"], message["m"])
            else:
                self.pool.record_from_worker(message["r"])
        elif kind == "status":
            self.connections = int(message.get("connections", 0))
            self.requests = int(message.get("requests", 0))
            self.antivirus = message.get("antivirus") if isinstance(message.get("antivirus"), dict) else None
            self.spool = message.get("spool") if isinstance(message.get("spool"), dict) else None
            self.directory = message.get("directory") if isinstance(message.get("directory"), dict) else None
            if isinstance(message.get("uf"), dict):
                self._upstream_failures(message["uf"])
            edge = message.get("edge")
            if isinstance(edge, dict):
                self.edge = {str(k): int(v) for k, v in edge.items()}
        elif kind == "policy":
            self.policy_version = message.get("version")
            self.policy_error = message.get("error")
            if message.get("resend"):
                self.pool.resend_whole(self)
        elif kind == "hello":
            self.greeted = True
            source = self.pool.sources.get(self.slot)
            if source is not None:
                source.forget_asked()  # what the last worker in this slot did not delete ships again
            self.pool.worker_ready(self)
        elif kind == "accepting":
            if self.state == "starting":
                self.state = "draining" if self.pool.draining else "running"

    def _upstream_failures(self, totals: dict) -> None:
        """The worker's totals by kind; the node's counters get what is new (so they keep the
        counts of workers that exited)."""
        node = self.pool.factory.counters.upstream_failures
        for kind, count in totals.items():
            delta = int(count) - self._failures_seen.get(kind, 0)
            if delta > 0:
                node[str(kind)] = node.get(str(kind), 0) + delta
                self._failures_seen[kind] = int(count)

    def processEnded(self, reason) -> None:
        self.state = "exited"
        self.connections = 0
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)

    def health(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state, "policy_version": self.policy_version,
                "connections": self.connections, "requests": self.requests}


class WorkerPool(Service):
    """In place of ProxyService on a node with --workers > 1: the same `listening`, `drain`,
    `resume` and graceful stop, carried out by the workers."""

    name = "proxy"

    def __init__(self, reactor, config: NodeConfig, count: int, factory: ProxyFactory, store,
                 record_sink: Callable[[AccessRecord], None], *, state=None) -> None:
        self.reactor = reactor
        self.config = config
        self.count = count
        self.factory = factory  # the parent's: its counters aggregate the workers' requests
        self.store = store
        self.record_sink = record_sink
        self.state = state
        self.endpoints = config.listen_endpoints
        self.listening_each: list[defer.Deferred] = [defer.Deferred() for _ in self.endpoints]
        self.listening = self.listening_each[0]
        self.ports: list = []
        self.sockets: list[dict[str, Any]] = []
        self.workers: dict[int, WorkerProcess] = {}  # slot -> the worker in it now
        self.restarts = 0
        self.draining = False
        self.stopping = False
        self._failures: dict[int, int] = {}
        self._pending_starts: dict[int, Any] = {}
        self.sources: dict[int, Any] = {}  # slot -> its spool as the shipper reads it (SlotSource)
        self._last_policy: Policy | None = store.current  # the version last sent to workers
        store.add_observer(self._policy_swapped)

    def ask_delete(self, slot: int, local_segment: int) -> bool:
        """From the shipper's thread: ask the slot's worker to delete a segment the store has.
        A worker that dies before it does so leaves it to ship again (deduplicated)."""
        worker = self.workers.get(slot)
        if worker is None or not worker.greeted or worker.state == "exited":
            return True  # its next worker hears nothing of it: shipped again after its hello
        self.reactor.callFromThread(worker.send, {"t": "ack", "segment": local_segment})
        return True

    # -- start: bind, then spawn ------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        # The node itself still checks the user directory (/health, cluster view) in this pool.
        self.factory.auth_pool.start()
        # One table of open connections for all workers: the limits are the node's (workers/limits.py).
        self.counts_path = os.path.join(self.config.state_dir, "run", "connections.table")
        create_table(Path(self.counts_path), self.count)
        d = defer.gatherResults([self._bind(desc, done) for desc, done in zip(self.endpoints, self.listening_each)],
                                consumeErrors=True)
        d.addCallback(lambda _: [self._spawn(slot) for slot in range(self.count)])
        d.addErrback(lambda _failure: None)  # told by ListeningFile ("cannot listen")

    def _bind(self, description: str, done: defer.Deferred) -> defer.Deferred:
        proxied, inner = split_endpoint(description)
        d = endpoints.serverFromString(self.reactor, with_backlog(inner)).listen(_NeverAccepts())

        def bound(port):
            port.stopReading()  # the kernel queue is the workers' to accept from
            self.ports.append(port)
            host = port.getHost()
            self.factory.listening.append((host.host, host.port))
            self.sockets.append({"parent_fd": port.fileno(), "family": 6 if isinstance(host, IPv6Address) else 4,
                                 "proxied": proxied})
            log.info("proxy listening on {host}:{port}{kind}, served by {n} workers", host=host.host,
                     port=host.port, kind=" (PROXY protocol)" if proxied else "", n=self.count)
            done.callback(port)
            return port

        d.addCallbacks(bound, lambda f: (done.errback(f), f)[1])
        return d

    def _spawn(self, slot: int) -> None:
        self._pending_starts.pop(slot, None)
        if self.stopping:
            return
        worker = WorkerProcess(self, slot)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        sockets = []
        for number, item in enumerate(self.sockets):
            child_fds[FIRST_FD + number] = item["parent_fd"]
            sockets.append({"fd": FIRST_FD + number, "family": item["family"], "proxied": item["proxied"]})
        spec = json.dumps({"config": config_to_json(self.config), "sockets": sockets, "slot": slot,
                           "counts": self.counts_path})
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(safesquid_tw.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.reactor.spawnProcess(worker, sys.executable, [sys.executable, "-m", "safesquid_tw.workers", spec],
                                  env=env, path=os.getcwd(), childFDs=child_fds)
        self.workers[slot] = worker
        log.info("worker {slot} started: pid {pid}", slot=slot, pid=worker.pid)

    def worker_ready(self, worker: WorkerProcess) -> None:
        policy = self.store.current
        if policy is not None:
            self._send_policy(worker, policy)
        if self.draining:
            worker.send({"t": "drain"})
        worker.send({"t": "listen"})  # accepts once the version above is in force

    def ca_changed(self, _ca) -> None:
        self._send_all({"t": "ca"})

    def any_accepting(self) -> bool:
        """/health says ready only once some worker takes connections and every worker that does
        serves a policy version: one still without any answers 503 "no policy yet" to whatever
        a load balancer sends it. (A newer version still compiling in a worker does not count: the
        one it serves meanwhile is a policy, and readiness must not flap on every push.)"""
        accepting = [w for w in self.workers.values() if w.state in ("running", "draining")]
        return bool(accepting) and all(w.policy_version is not None for w in accepting)

    def worker_ended(self, worker: WorkerProcess, reason) -> None:
        code = getattr(reason.value, "exitCode", None)
        signalled = getattr(reason.value, "signal", None)
        if self.stopping:
            log.info("worker {pid} stopped", pid=worker.pid)
            return
        self.restarts += 1
        ran = self.reactor.seconds() - worker.started_at
        failures = 0 if ran >= STEADY_AFTER else self._failures.get(worker.slot, 0) + 1
        self._failures[worker.slot] = failures
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, failures - 1)))
        log.error("worker {pid} exited ({how}); restarting it in {delay:g} s ({n} restarts so far)",
                  pid=worker.pid, how=f"signal {signalled}" if signalled else f"exit code {code}", delay=delay,
                  n=self.restarts)
        self._pending_starts[worker.slot] = self.reactor.callLater(delay, self._spawn, worker.slot)

    # -- what flows from and to the workers ---------------------------------------------------
    def record_from_worker(self, fields: dict[str, Any]) -> None:
        try:
            record = record_from_json(fields)
        except (TypeError, ValueError) as e:
            log.error("a worker sent an access record that does not fit ({why})", why=str(e))
            return
        factory = self.factory
        factory.requests += 1
        factory.counters.count_request(record.action, record.status, record.duration_ms / 1000.0,
                                       record.bytes_in, record.bytes_out)
        self.record_sink(record)

    def line_from_worker(self, line: str, figures: list) -> None:
        """A record the worker encoded (and spooled): counted here and written to access.log."""
        try:
            action, status, duration_ms, bytes_in, bytes_out = figures
            data = line.encode("ascii")
            if not data.endswith(b"\n") or b"\n" in data[:-1]:
                raise ValueError("not one line")
            factory = self.factory
            factory.counters.count_request(str(action), int(status), float(duration_ms) / 1000.0,
                                           int(bytes_in), int(bytes_out))
        except (TypeError, ValueError, UnicodeEncodeError) as e:
            log.error("a worker sent an access record that does not fit ({why})", why=str(e))
            return
        factory.requests += 1
        self.access_log.write_line(data)

    access_log = None  # the node's AccessLogWriter (set by the assembly)

    def _policy_swapped(self, policy: Policy) -> None:
        # The store swaps versions on the reactor thread (PolicyStore.commit_prepared). Workers
        # that run the version before get only what changed since (workers/policydelta.py).
        previous, self._last_policy = self._last_policy, policy
        change = None
        for worker in self.workers.values():
            if worker.greeted and worker.state != "exited":
                if previous is not None and worker.sent_digest == previous.digest:
                    if change is None:
                        change = change_message(previous, policy)
                    worker.send(change)
                    worker.sent_digest = policy.digest
                else:
                    self._send_policy(worker, policy)

    def _send_policy(self, worker: WorkerProcess, policy: Policy) -> None:
        worker.send(whole_message(policy))
        worker.sent_digest = policy.digest

    def resend_whole(self, worker: WorkerProcess) -> None:
        """The worker got a change against a version it does not run: the whole version."""
        policy = self.store.current
        if policy is not None and worker.state != "exited":
            log.info("worker {pid} needs the whole policy version {version}", pid=worker.pid,
                     version=policy.version)
            self._send_policy(worker, policy)

    def _send_all(self, message: dict[str, Any]) -> None:
        for worker in self.workers.values():
            if worker.greeted and worker.state != "exited":
                worker.send(message)

    def hup(self) -> None:
        """SIGHUP reached the node: the workers hear it too (their policy follows the store)."""
        self._send_all({"t": "hup"})

    def drain(self) -> str:
        self.draining = True
        if self.state is not None:
            self.state.draining = True
        for worker in self.workers.values():
            if worker.state == "running":
                worker.state = "draining"
        self._send_all({"t": "drain"})
        log.info("draining {n} workers: /health says 503; new connections refused in {grace} s",
                 n=len(self.workers), grace=self.config.drain_grace)
        return f"draining; new connections refused in {self.config.drain_grace:g} s"

    def resume(self) -> str:
        self.draining = False
        if self.state is not None:
            self.state.draining = False
        for worker in self.workers.values():
            if worker.state == "draining":
                worker.state = "running"
        self._send_all({"t": "resume"})
        log.info("resumed: taking traffic again")
        return "resumed"

    def health(self) -> list[dict[str, Any]]:
        return [self.workers[slot].health() for slot in sorted(self.workers)]

    def edge_counters(self) -> dict[str, int]:
        """Connections closed at the edge, by reason, summed over the workers (counts of a worker
        that exited are lost with it)."""
        total = dict(self.factory.edge_counters())
        for worker in self.workers.values():
            for reason, count in worker.edge.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def antivirus_health(self) -> dict | None:
        """The workers' scanners as one: counts summed, per service and in all."""
        return merge_antivirus([w.antivirus for w in self.workers.values() if w.antivirus is not None])

    def directory_health(self, own: dict | None) -> dict | None:
        """The user directory as the node sees it: the workers' look-ups (they authenticate the
        users) and the node's own periodic check, summed; reachable as last seen by any."""
        return merge_directory([own] + [w.directory for w in self.workers.values() if w.state != "exited"])

    def spool_health(self) -> dict[str, Any]:
        """The node's spool as one: the workers' spools (where records are written) summed, with
        the node's own (segments left from a run without workers)."""
        return merge_spool([w.spool for w in self.workers.values() if w.spool is not None] + [self._own_spool()])

    def _own_spool(self) -> dict[str, Any]:
        return self.own_spool_stats() if self.own_spool_stats is not None else {}

    own_spool_stats: Callable[[], dict[str, Any]] | None = None

    def connections(self) -> int:
        return sum(w.connections for w in self.workers.values())

    # -- stop -------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        # Keep-alive clients reconnect (to another node, through the balancer) after each response.
        self._send_all({"t": "closing"})
        if self.stop_grace_seconds > 0:
            # /health already says 503; the workers keep serving so balancers move away first.
            d: defer.Deferred = defer.Deferred()
            self.reactor.callLater(self.stop_grace_seconds, d.callback, None)
            yield d
        self.stopping = True
        for call in self._pending_starts.values():
            if call.active():
                call.cancel()
        running = [w for w in self.workers.values() if w.state != "exited"]
        for worker in running:
            worker.state = "stopping"
            try:
                worker.transport.signalProcess("TERM")  # graceful: in-flight requests finish
            except Exception:
                pass
        kill = self.reactor.callLater(STOP_BOUND, self._kill, running)
        yield defer.DeferredList([w.ended for w in running])
        if kill.active():
            kill.cancel()
        for port in self.ports:
            yield port.stopListening()
        self.factory.auth_pool.stop()

    @property
    def stop_grace_seconds(self) -> float:
        return self.config.stop_grace

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.state != "exited":
                log.warn("worker {pid} did not finish within {bound:g} s: killed", pid=worker.pid, bound=STOP_BOUND)
                try:
                    worker.transport.signalProcess("KILL")
                except Exception:
                    pass


_SUMMED = ("scans", "detections", "failures", "unscanned", "cache_entries", "cache_hits")


def merge_antivirus(reports: list[dict]) -> dict | None:
    if not reports:
        return None
    merged = dict(reports[0])
    for key in _SUMMED:
        merged[key] = sum(int(r.get(key) or 0) for r in reports)
    services: dict[str, dict] = {}
    for report in reports:
        for service in report.get("services") or []:
            seen = services.get(service.get("url"))
            if seen is None:
                services[service.get("url")] = dict(service)
            else:
                counts = {key: int(seen.get(key) or 0) + int(service.get(key) or 0)
                          for key in ("scans", "detections", "failures")}
                # The service's state is what the worker that looked last found (one worker may
                # have met the scanner down while another has not tried it since).
                if (service.get("observed_at") or 0) > (seen.get("observed_at") or 0):
                    seen.clear()
                    seen.update(service)
                seen.update(counts)
    merged["services"] = list(services.values())
    return merged


def merge_directory(reports: list[dict | None]) -> dict | None:
    present = [r for r in reports if r]
    if not present:
        return None
    merged = dict(present[0])
    for key in ("lookups", "failures", "cached_users"):
        merged[key] = sum(int(r.get(key) or 0) for r in present)
    known = [r for r in present if r.get("reachable") is not None]
    if known:
        latest = max(known, key=lambda r: r.get("since") or 0)
        for key in ("reachable", "last_error", "since"):
            merged[key] = latest.get(key)
    return merged


class MergedAntivirus:
    """The workers' scanners as one object for AntivirusCollector (stats())."""

    def __init__(self, pool: "WorkerPool", own) -> None:
        self.pool, self.own = pool, own

    def stats(self) -> dict:
        return self.pool.antivirus_health() or self.own.stats()


class MergedEdge:
    """The workers' edge counters for EdgeCollector (edge_counters())."""

    def __init__(self, pool: "WorkerPool") -> None:
        self.edge_counters = pool.edge_counters


_SPOOL_SUMMED = ("backlog_records", "backlog_bytes", "memory_records", "memory_bytes", "dropped_records")


def merge_spool(reports: list[dict]) -> dict[str, Any]:
    merged: dict[str, Any] = {key: sum(int(r.get(key) or 0) for r in reports) for key in _SPOOL_SUMMED}
    unwritable = [r for r in reports if r.get("writable") is False]
    merged["writable"] = not unwritable
    merged["reason"] = unwritable[0].get("reason") if unwritable else None
    since = [r["failing_since"] for r in unwritable if r.get("failing_since") is not None]
    merged["failing_since"] = min(since) if since else None
    return merged


__all__ = ["WorkerPool", "cpu_count", "signal"]
