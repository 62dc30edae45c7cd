"""The node's side of its workers, without processes: records, policy, drain, restarts on a
task.Clock-driven reactor."""

from __future__ import annotations

import json

from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.config import Limits, NodeConfig
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory
from safesquid_tw.workers.child import config_from_json, config_to_json, record_from_json, record_to_json
from safesquid_tw.workers.frames import FrameReader, encode
from safesquid_tw.workers.pool import BACKOFF_FIRST, WorkerPool, WorkerProcess

DOC = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = bytearray()
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written += data

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict]:
        got: list[dict] = []
        FrameReader(got.append).feed(bytes(self.written))
        return got


def _pool(tmp_path, reactor):
    store = PolicyStore(tmp_path)
    records: list[AccessRecord] = []
    factory = ProxyFactory(reactor=reactor, limits=Limits(), node_name="n1", current_policy=lambda: store.current,
                           record_sink=records.append, resolver=Resolver(reactor, threads_max=1, timeout=1, ttl=1))
    state = NodeState(role="standalone", node="n1")
    pool = WorkerPool(reactor, NodeConfig(node_name="n1"), 2, factory, store, records.append, state=state)
    spawned: list[int] = []
    pool._spawn = lambda slot: spawned.append(slot)  # no processes in a unit test
    return pool, store, records, state, spawned


def _worker(pool, slot: int, pid: int) -> WorkerProcess:
    worker = WorkerProcess(pool, slot)
    worker.makeConnection(FakeTransport(pid))
    pool.workers[slot] = worker
    return worker


def _say(worker: WorkerProcess, message: dict) -> None:
    worker.childDataReceived(1, encode(message))


def test_config_and_records_cross_the_pipe_unchanged():
    config = NodeConfig(node_name="n1", more_listen=("haproxy:tcp:0",), limits=Limits(max_connections=7))
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
    record = AccessRecord(time=1.5, node="n1", client="10.0.0.1", user=None, method="GET", url="http://a.test/",
                          status=200, bytes_in=10, bytes_out=20, duration_ms=1.0, action="allow", rule=None,
                          category=None, application=None, policy_version=3, groups=("g",), dlp=("card",))
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))) == record


def test_a_new_worker_gets_the_policy_then_listens_and_counts_as_ready_once_accepting(tmp_path):
    reactor = MemoryReactorClock()
    pool, store, _records, state, _spawned = _pool(tmp_path, reactor)
    state.ready_gates.append(pool.any_accepting)
    store.apply_document(DOC, source="file p.json")
    state.policy_version = 1
    worker = _worker(pool, 0, 101)
    _say(worker, {"t": "hello", "pid": 101})
    kinds = [m["t"] for m in worker.transport.messages()]
    assert kinds == ["policy", "listen"] and worker.transport.messages()[0]["version"] == 1
    assert not state.ready
    _say(worker, {"t": "accepting"})
    _say(worker, {"t": "policy", "version": 1, "error": None})
    assert state.ready
    assert pool.health() == [{"pid": 101, "state": "running", "policy_version": 1, "connections": 0, "requests": 0}]


def test_the_node_is_not_ready_while_an_accepting_worker_has_no_policy(tmp_path):
    """A slave without a cached policy: its workers accept (and answer 503) before the master's
    first version is compiled in each; the node says ready only once every one of them serves it,
    or a load balancer sends traffic that gets 503."""
    reactor = MemoryReactorClock()
    pool, store, _records, state, _spawned = _pool(tmp_path, reactor)
    state.ready_gates.append(pool.any_accepting)
    a, b = _worker(pool, 0, 101), _worker(pool, 1, 102)
    for worker in (a, b):
        _say(worker, {"t": "hello", "pid": worker.pid})
        _say(worker, {"t": "accepting"})
    store.apply_document(DOC, source="master")
    state.policy_version = 1
    assert not state.ready
    _say(a, {"t": "policy", "version": 1, "error": None})
    assert not state.ready  # b still answers "no policy yet"
    _say(b, {"t": "policy", "version": 1, "error": None})
    assert state.ready
    # A later version being compiled in the workers does not make the node flap.
    _say(a, {"t": "policy", "version": 2, "error": None})
    assert state.ready


def test_records_from_workers_enter_the_one_access_log_and_the_counters(tmp_path):
    reactor = MemoryReactorClock()
    pool, _store, records, _state, _spawned = _pool(tmp_path, reactor)
    a, b = _worker(pool, 0, 101), _worker(pool, 1, 102)
    base = dict(time=1.0, node="n1", client="c", user=None, method="GET", status=200, bytes_in=1, bytes_out=2,
                duration_ms=1.0, action="allow", rule=None, category=None, application=None, policy_version=1)
    _say(a, {"t": "rec", "r": {**base, "url": "http://a.test/"}})
    _say(b, {"t": "rec", "r": {**base, "url": "http://b.test/"}})
    assert [r.url for r in records] == ["http://a.test/", "http://b.test/"]
    assert pool.factory.requests == 2


def test_policy_swaps_and_drain_reach_every_worker(tmp_path):
    reactor = MemoryReactorClock()
    pool, store, _records, state, _spawned = _pool(tmp_path, reactor)
    workers = [_worker(pool, slot, 100 + slot) for slot in range(2)]
    for w in workers:
        w.greeted = True
        _say(w, {"t": "accepting"})
    store.apply_document(DOC, source="master")
    assert pool.drain().startswith("draining") and state.draining
    pool.resume()
    for w in workers:
        assert [m["t"] for m in w.transport.messages()] == ["policy", "drain", "resume"]


def test_a_dead_worker_is_restarted_with_growing_back_off(tmp_path):
    reactor = MemoryReactorClock()
    pool, _store, _records, _state, spawned = _pool(tmp_path, reactor)
    for attempt in range(3):
        worker = _worker(pool, 0, 200 + attempt)
        worker.processEnded(Failure(ProcessTerminated(signal=9)))
        delay = BACKOFF_FIRST * 2 ** attempt
        reactor.advance(delay - 0.01)
        assert spawned == [0] * attempt
        reactor.advance(0.02)
        assert spawned == [0] * (attempt + 1)
    assert pool.restarts == 3 and pool.health()[0]["state"] == "exited"


def test_status_reports_sum_into_the_nodes_edge_counters_and_connections(tmp_path):
    reactor = MemoryReactorClock()
    pool, _store, _records, _state, _spawned = _pool(tmp_path, reactor)
    a, b = _worker(pool, 0, 101), _worker(pool, 1, 102)
    _say(a, {"t": "status", "connections": 3, "requests": 5, "edge": {"per_client_refused": 2}})
    _say(b, {"t": "status", "connections": 4, "requests": 6, "edge": {"per_client_refused": 1}})
    assert pool.connections() == 7
    assert pool.edge_counters()["per_client_refused"] == 3


def test_a_slaves_workers_cross_the_wire_and_a_lagging_one_is_warned_of():
    from safesquid_tw.cluster import wire
    from safesquid_tw.master.registry import SlaveRecord

    status = {"policy_version": 2, "uptime": 1.0, "spool_records": 0, "spool_bytes": 0,
              "workers": [{"pid": 101, "state": "running", "policy_version": 2, "connections": 1},
                          {"pid": 102, "state": "running", "policy_version": 1, "connections": 0}]}
    wire.SLAVE_STATUS.check(status, "status")
    record = SlaveRecord(name="s1", connected=True, policy_version=2, workers=status["workers"])
    assert "1 worker(s) not on version 2 yet" in record.warnings(2)


def test_a_workers_log_lines_are_logged_again_at_their_level_under_its_pid(tmp_path):
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from safesquid_tw.workers.child import log_line

    reactor = MemoryReactorClock()
    pool, *_ = _pool(tmp_path, reactor)
    worker = _worker(pool, 0, 101)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        line = log_line({"log_level": LogLevel.warn, "log_format": "upstream error for {url}", "url": "http://a.test/"})
        worker.childDataReceived(2, line[:10].encode())
        worker.childDataReceived(2, line[10:].encode() + b"Traceback (most recent call last)\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [(e["log_level"], formatEvent(e)) for e in events if e.get("pid") == 101]
    assert mine == [(LogLevel.warn, "worker 101: upstream error for http://a.test/"),
                    (LogLevel.error, "worker 101: Traceback (most recent call last)")]


def test_the_workers_scanners_add_up():
    from safesquid_tw.workers.pool import merge_antivirus

    one = {"enabled": True, "fail_mode": "block", "scans": 2, "detections": 1, "failures": 0, "unscanned": 0,
           "cache_entries": 1, "cache_hits": 0,
           "services": [{"url": "icap://a/", "state": "up", "scans": 2, "detections": 1, "failures": 0}]}
    two = {**one, "scans": 3, "detections": 0, "services": [{**one["services"][0], "scans": 3, "detections": 0}]}
    merged = merge_antivirus([one, two])
    assert (merged["scans"], merged["detections"]) == (5, 1)
    assert merged["services"] == [{"url": "icap://a/", "state": "up", "scans": 5, "detections": 1, "failures": 0}]
    assert merge_antivirus([]) is None


def test_a_scanners_state_is_what_the_worker_that_looked_last_found():
    """One worker met the scanner down; the other has not tried it since it was fine."""
    from safesquid_tw.workers.pool import merge_antivirus

    fine = {"scans": 1, "detections": 1, "failures": 0,
            "services": [{"url": "icap://a/", "state": "ok", "reachable": True, "observed_at": 100.0,
                          "scans": 1, "detections": 1, "failures": 0}]}
    down = {"scans": 0, "detections": 0, "failures": 1,
            "services": [{"url": "icap://a/", "state": "down", "reachable": False, "observed_at": 130.0,
                          "scans": 0, "detections": 0, "failures": 1}]}
    for reports in ([fine, down], [down, fine]):
        service = merge_antivirus(reports)["services"][0]
        assert (service["state"], service["reachable"]) == ("down", False)
        assert (service["scans"], service["detections"], service["failures"]) == (1, 1, 1)


def test_a_database_url_never_reaches_a_workers_command_line():
    config = NodeConfig(report_store="postgresql://u:secret@db/reports", report_read_url="postgresql://u:s@r/x")
    text = json.dumps(config_to_json(config))
    assert "secret" not in text and "postgresql" not in text
