"""The control plane in memory: a master's `ControlPlane` behind its real portal port (TLS with
ALPN, Perspective Broker) and slaves' `ClusterClient`s, joined by `iosim`, on a `task.Clock`.

Each connection is pumped by hand, so a test decides when bytes move (a slave that is never
pumped has vanished without closing) and when time passes. Disk work that runs in threads in a
node runs inline here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from safesquid_tw.accesslog.spool import Spool
from safesquid_tw.cluster import master_side, slave_side, wire
from safesquid_tw.cluster.jellysafety import ClusterServerFactory
from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
from safesquid_tw.cluster.master_side import ControlPlane, ControlRoot
from safesquid_tw.cluster.mux import PortalPortFactory
from safesquid_tw.cluster.shipper import LogShipper
from safesquid_tw.cluster.slave_side import ClusterClient
from safesquid_tw.cluster.tlsconfig import MasterTrust, load_or_create_master_identity
from safesquid_tw.config import NodeConfig
from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.portal.health import HealthResource
from safesquid_tw.reporting.sqlitestore import ReportStore
from safesquid_tw.assembly.base import state_follows_store
from safesquid_tw.assembly.roles import build_node_service
from safesquid_tw.util.threads import inline

KEY = ClusterKey.from_activation_key("unit-test-cluster-key")
OTHER_KEY = ClusterKey.from_activation_key("some-other-cluster-key")
RELEASE = "0.1.0"
MASTER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8888)


def policy(*denied: str, **sections) -> dict:
    rules = [{"name": f"deny-{i}", "action": "deny", "domains": [d]} for i, d in enumerate(denied)]
    return {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": rules}, **sections}


@pytest.fixture
def clock() -> Clock:
    # A Clock that also passes for a reactor with a name resolver (the client builds an endpoint).
    return MemoryReactorClock()


class Master:
    def __init__(self, root: Path, clock: Clock, *, keepalive: float = 10.0, version: str = RELEASE) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.store = PolicyStore(root)
        self.store.apply_document(policy("first.invalid"), source="test")
        self.registry = SlaveRegistry(clock=clock.seconds)
        self.reports = ReportStore(root / "reports.sqlite3")
        self.plane = ControlPlane(
            reactor=clock, key=KEY, version=NodeVersion(version), store=self.store, registry=self.registry,
            ingest=self.reports.ingest, record_dropped=self.reports.record_dropped, keepalive=keepalive,
            in_thread=inline,  # the report store and the spool run at once, no threads
        )
        identity = load_or_create_master_identity(root, discover=lambda: ["127.0.0.1"], hostname="master")
        self.port = PortalPortFactory(identity.server_options(), ClusterServerFactory(ControlRoot(self.plane)),
                                      Site(Resource()), clock=clock)

    def apply(self, document: dict) -> int:
        return self.store.apply_document(document, source="test").version

    def record(self, name: str):
        return self.registry.records.get(name)


class Link:
    """One control-plane connection: the pump that moves its bytes, and the slave's login."""

    def __init__(self, slave: "Slave", pump: iosim.IOPump, client_tls, login: defer.Deferred) -> None:
        self.slave = slave
        self.pump = pump
        self.client_tls = client_tls
        self.outcome: list = []
        login.addBoth(self.outcome.append)

    def flush(self) -> None:
        self.pump.flush()

    @property
    def refusal(self) -> str:
        assert self.outcome and isinstance(self.outcome[0], Failure), f"the login did not fail: {self.outcome}"
        return self.outcome[0].getErrorMessage()

    def close(self) -> None:
        self.client_tls.transport.loseConnection()
        self.pump.flush()


class Slave:
    def __init__(self, root: Path, clock: Clock, name: str, *, key: ClusterKey = KEY, version: str = RELEASE,
                 keepalive: float = 10.0, poll_interval: float = 60.0) -> None:
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.name = name
        self.store = PolicyStore(self.root)
        self.state = NodeState(role="slave", node=name)
        state_follows_store(self.state, self.store, now=clock.seconds)
        self.spool = Spool(self.root / "spool", node=name, segment_bytes=64 * 1024, cap_bytes=1 << 20)
        self.shipper = LogShipper(clock, self.spool, in_thread=inline)
        self.shipper.startService()
        self.tasks: list[str] = []
        self.client = ClusterClient(
            reactor=clock, master="127.0.0.1:8888", key=key, version=NodeVersion(version), node_name=name,
            trust=MasterTrust.for_state_dir(self.root), store=self.store, state=self.state, shipper=self.shipper,
            status_extra=lambda: {"requests_total": 7, "requests_per_second": 1.5},
            on_task=self._task, keepalive=keepalive, poll_interval=poll_interval,
        )

    def _task(self, task: str) -> str:
        self.tasks.append(task)
        return f"{task} done"

    @property
    def version(self) -> int | None:
        return self.store.current.version if self.store.current else None

    def connect(self, master: Master, address: str = "127.0.0.2") -> Link:
        peer = IPv4Address("TCP", address, 40000 + len(self.name))
        tls = TLSMemoryBIOFactory(self.client.creator, True, self.client.factory, clock=self.clock)
        client_tls, _server, pump = iosim.connectedServerAndClient(
            lambda: master.port.buildProtocol(peer),
            lambda: tls.buildProtocol(MASTER_ADDRESS),
            clientTransportFactory=lambda p: iosim.FakeTransport(p, False, peer, MASTER_ADDRESS),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, MASTER_ADDRESS, peer),
            greet=False,
            clock=self.clock,
        )
        login = self.client._login(client_tls.wrappedProtocol)
        link = Link(self, pump, client_tls, login)
        link.flush()
        return link


@pytest.fixture
def master(tmp_path, clock) -> Master:
    return Master(tmp_path / "master", clock)


def advance(clock: Clock, seconds: float, *links: Link, step: float = 0.5) -> None:
    """Let time pass while every link keeps moving its bytes (peers that answer)."""
    steps = round(seconds / step)
    for _ in range(steps):
        clock.advance(step)
        flush_all(*links)


def flush_all(*links: Link) -> None:
    for _ in range(5):
        moved = False
        for link in links:
            moved = link.pump.flush() or moved
        if not moved:
            return


# --------------------------------------------------------------------------------------------
# Login and the first sync
# --------------------------------------------------------------------------------------------


def test_login_fetches_the_masters_policy(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    assert link.outcome == [None], link.outcome
    assert slave.client.avatar is not None
    assert slave.version == 1 and slave.store.current.digest == master.store.current.digest
    assert slave.store.cache_path.exists(), "the policy must be cached before it is acknowledged"
    assert slave.state.policy_source == "master"
    rec = master.record("slave1")
    assert rec.connected and rec.address == "127.0.0.2"
    assert rec.policy_version == 1 and rec.policy_error is None
    assert rec.requests_total == 7 and rec.requests_per_second == 1.5
    assert (slave.root / "tls" / "master-fingerprint").exists(), "trust on first use is recorded"


def test_a_new_version_is_pushed_to_every_connected_slave_without_waiting(master, clock, tmp_path):
    slaves = [Slave(tmp_path, clock, f"slave{i}") for i in range(3)]
    links = [s.connect(master) for s in slaves]
    assert [s.version for s in slaves] == [1, 1, 1]

    assert master.apply(policy("first.invalid", "second.invalid")) == 2
    flush_all(*links)  # bytes move; no time passes
    assert [s.version for s in slaves] == [2, 2, 2]
    for s in slaves:
        assert s.store.current.digest == master.store.current.digest
        assert master.record(s.name).policy_version == 2
        assert master.registry.records[s.name].warnings(2) == []


def test_a_policy_larger_than_one_message_travels_in_chunks(master, clock, tmp_path):
    domains = [f"host-{i:06d}.bulk.invalid" for i in range(30000)]
    big = policy(categories={"bulk": {"description": "many hosts", "domains": domains}})
    master.apply(big)
    chunks = len(master.plane.publication.chunks)
    assert chunks >= 3 and all(len(c) <= wire.MAX_CHUNK_BYTES for c in master.plane.publication.chunks)

    slave = Slave(tmp_path, clock, "slave1")
    slave.connect(master)
    assert slave.version == 2 and slave.store.current.digest == master.store.current.digest


def test_the_slow_poll_fetches_a_version_whose_announcement_was_lost(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1", poll_interval=60)
    link = slave.connect(master)
    master.plane.avatars["slave1"].notify_policy = lambda version: None  # the announcement is lost
    master.apply(policy("missed.invalid"))
    link.flush()
    assert slave.version == 1
    advance(clock, 59, link)
    assert slave.version == 1
    advance(clock, 1, link)
    assert slave.version == 2


def test_a_reconnecting_slave_takes_what_it_missed(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    link.close()
    assert slave.client.avatar is None and not master.record("slave1").connected
    master.apply(policy("while-away.invalid"))
    assert slave.version == 1
    slave.connect(master)
    assert slave.version == 2 and master.record("slave1").connected


def test_a_slave_that_refuses_a_version_keeps_its_own_and_the_master_shows_why(master, clock, tmp_path, monkeypatch):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)

    def refuse(blob, version, source="master"):
        raise PolicyError("access.rules[0]", "this release does not know that field")

    monkeypatch.setattr(slave.store, "prepare_blob", refuse)
    master.apply(policy("refused.invalid"))
    link.flush()
    assert slave.version == 1
    rec = master.record("slave1")
    assert "version 2" in rec.policy_error and "does not know that field" in rec.policy_error
    assert any("refused a policy" in w for w in rec.warnings(2))


# --------------------------------------------------------------------------------------------
# Admission
# --------------------------------------------------------------------------------------------


def test_a_wrong_key_is_refused_and_the_connection_dropped(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "intruder", key=OTHER_KEY)
    link = slave.connect(master)
    assert "activation key" in link.refusal
    assert slave.version is None and slave.client.avatar is None
    assert "intruder" not in master.plane.avatars and master.record("intruder") is None
    # The refused slave closes its own connection at once, so its client service retries clean.
    assert link.client_tls.transport.disconnecting


def test_an_incompatible_release_is_refused_naming_both(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "future", version="9.9.0")
    link = slave.connect(master)
    assert "9.9.0" in link.refusal and RELEASE in link.refusal
    assert master.record("future") is None


def test_a_patch_release_is_admitted(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "patched", version="0.1.7")
    link = slave.connect(master)
    assert link.outcome == [None] and slave.version == 1
    assert master.record("patched").product_version == "0.1.7", "the cluster view shows the slave's own release"


def test_the_allow_list_admits_only_listed_addresses(master, clock, tmp_path):
    master.apply(policy(access_restriction={"slave_allow_enabled": True, "slave_allow": ["127.0.0.2/32"]}))
    outsider = Slave(tmp_path, clock, "outsider")
    link = outsider.connect(master, address="127.0.0.3")
    assert "allow list" in link.refusal and "127.0.0.3" in link.refusal
    insider = Slave(tmp_path, clock, "insider")
    assert insider.connect(master, address="127.0.0.2").outcome == [None]


def test_a_name_held_by_a_live_slave_is_refused_and_taken_over_once_it_is_silent(master, clock, tmp_path):
    first = Slave(tmp_path, clock, "twin")
    first_link = first.connect(master)
    second = Slave(tmp_path / "other", clock, "twin")

    # The master asks the first whether it is alive; it answers (its bytes move): refused.
    link = second.connect(master, address="127.0.0.3")
    flush_all(first_link, link)
    assert "twin" in link.refusal and "already connected" in link.refusal
    assert master.record("twin").address == "127.0.0.2"

    # The first has vanished without closing (its connection is never pumped again).
    retry = second.connect(master, address="127.0.0.3")
    assert retry.outcome == []
    clock.advance(3)  # the liveness ping times out
    retry.flush()
    assert retry.outcome == [None], retry.outcome
    assert master.record("twin").connected and master.record("twin").address == "127.0.0.3"
    assert second.version == 1


# --------------------------------------------------------------------------------------------
# Keepalives
# --------------------------------------------------------------------------------------------


def test_the_master_marks_a_silent_slave_gone_within_three_keepalives(tmp_path, clock):
    master = Master(tmp_path / "master", clock, keepalive=1.0)
    slave = Slave(tmp_path, clock, "slave1", keepalive=1.0)
    link = slave.connect(master)
    assert master.record("slave1").connected
    # Never pumped again: the slave neither answers pings nor reports.
    for second in range(3):
        clock.advance(1)
        assert master.record("slave1").connected, f"marked gone too early, after {second + 1} s"
    clock.advance(1)
    assert not master.record("slave1").connected
    assert "slave1" not in master.plane.avatars
    assert link.pump.serverIO.disconnecting


def test_a_slave_drops_a_master_that_stops_answering(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1", keepalive=1.0)
    link = slave.connect(master)
    clock.advance(1)  # a status report goes out and is never answered
    clock.advance(4.9)
    assert slave.client.avatar is not None
    clock.advance(0.1)  # the call's deadline (at least 5 s)
    link.flush()
    assert slave.client.avatar is None
    assert slave.shipper.sender is None, "records wait in the spool while the master is away"


def test_status_reports_keep_the_cluster_view_fresh(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1", keepalive=2.0)
    link = slave.connect(master)
    seen = master.record("slave1").last_seen
    clock.advance(2)
    link.flush()
    assert master.record("slave1").last_seen == seen + 2
    assert master.record("slave1").connected


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def test_tasks_reach_the_slave_and_their_answer_comes_back(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    answers = []
    for task in ("drain", "resume", "reload"):
        master.registry.send_task("slave1", task).addBoth(answers.append)
        link.flush()
    assert answers == ["drain done", "resume done", "reload done"]
    assert slave.tasks == ["drain", "resume", "reload"]

    refused = []
    master.registry.send_task("slave1", "format-disk").addErrback(refused.append)
    master.registry.send_task("nobody", "drain").addErrback(refused.append)
    assert [f.type for f in refused] == [ValueError, KeyError]
    assert slave.tasks == ["drain", "resume", "reload"]


def _new_client_connection(factory) -> bytes:
    """What a client connecting to the proxy right now receives before sending anything."""
    transport = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 50000)).makeConnection(transport)
    return transport.value()


def _health_status(state: NodeState) -> int:
    request = DummyRequest([b""])
    request.method = b"GET"
    HealthResource(state).render(request)
    return request.responseCode or 200


def test_drain_turns_health_503_then_refuses_new_connections_and_resume_undoes_it(tmp_path):
    """The slave's own handling of drain and resume, in the node as `twistd` assembles it."""
    reactor = MemoryReactorClock()
    key_file = tmp_path / "activation.key"
    key_file.write_text("unit-test-cluster-key\n")
    config = NodeConfig(role="slave", master="127.0.0.1:8888", activation_key_file=str(key_file),
                        state_dir=str(tmp_path / "slave"), node_name="slave1", drain_grace=10.0,
                        listen="tcp:0:interface=127.0.0.2", portal="tcp:0:interface=127.0.0.2")
    node = build_node_service(config, reactor)
    node.policy_store.apply_document(policy(), source="test")
    state, factory, client = node.node_state, node.proxy_factory, node.cluster_client
    assert _health_status(state) == 200 and _new_client_connection(factory) == b""

    answer = client.run_task("drain")
    assert "10 s" in answer
    assert _health_status(state) == 503 and state.status == "draining"
    reactor.advance(9.9)
    assert _new_client_connection(factory) == b"", "new connections are taken until the balancer moves away"
    reactor.advance(0.1)
    assert _new_client_connection(factory).startswith(b"HTTP/1.1 503 ")

    assert client.run_task("resume") == "resumed"
    assert _health_status(state) == 200 and _new_client_connection(factory) == b""

    # A resume before the grace ends cancels the refusal that was scheduled.
    client.run_task("drain")
    reactor.advance(5)
    client.run_task("resume")
    reactor.advance(10)
    assert _health_status(state) == 200 and _new_client_connection(factory) == b""


# --------------------------------------------------------------------------------------------
# Log shipping over the control plane
# --------------------------------------------------------------------------------------------


def _record(i: int) -> bytes:
    return (b'{"ts": 1795300000.5, "node": "slave1", "client": "10.0.0.1", "method": "GET", '
            b'"url": "http://example.test/%d", "status": 200, "bytes_in": 10, "bytes_out": 20, '
            b'"action": "allow"}' % i)


def test_records_ship_to_the_report_store_once(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    for i in range(25):
        slave.spool.append(_record(i))
    for _ in range(6):
        clock.advance(0.5)
        link.flush()
    assert master.reports.count() == 25
    assert slave.spool.backlog_records == 0 and slave.spool.sealed_segments() == []

    # A batch sent again (say, its acknowledgement was lost) is recognised and not stored twice.
    answers = []
    slave.client.avatar.callRemote("ship_log_batch", 1, 0, [_record(0)]).addBoth(answers.append)
    slave.client.avatar.callRemote("ship_log_batch", 1, 0, [_record(0)]).addBoth(answers.append)
    link.flush()
    assert answers == [1, 0]


def test_a_slave_ships_its_records_as_joined_lines(master, clock, tmp_path, monkeypatch):
    calls = []
    real = master_side.SlaveAvatar.remote_ship_log_lines
    monkeypatch.setattr(master_side.SlaveAvatar, "remote_ship_log_lines",
                        lambda self, *args: (calls.append(args[:2]), real(self, *args))[1])
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    for i in range(25):
        slave.spool.append(_record(i))
    for _ in range(6):
        clock.advance(0.5)
        link.flush()
    assert master.reports.count() == 25 and calls
    assert slave.spool.backlog_records == 0
    # Sent again, the same lines are recognised and not stored twice; a bad record among them is
    # set aside alone.
    answers = []
    lines = b"\n".join([_record(0), b"not json", _record(2)])
    slave.client.avatar.callRemote("ship_log_lines", 7, 0, lines).addBoth(answers.append)
    slave.client.avatar.callRemote("ship_log_lines", 7, 0, lines).addBoth(answers.append)
    link.flush()
    assert answers == [2, 0]
    assert [row["seq"] for row in master.reports.quarantined(node="slave1")] == [1]


def test_a_slave_ships_lists_to_a_master_without_joined_lines(master, clock, tmp_path, monkeypatch):
    monkeypatch.delattr(master_side.SlaveAvatar, "remote_ship_log_lines")
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    for i in range(25):
        slave.spool.append(_record(i))
    for _ in range(6):
        clock.advance(0.5)
        link.flush()
    assert master.reports.count() == 25
    assert slave.spool.backlog_records == 0 and slave.spool.sealed_segments() == []
    assert slave.client._ship_lines is False


def test_lines_shipped_while_postgresql_is_down_arrive_once_when_it_is_back(
    clock, tmp_path, postgres_server, monkeypatch
):
    import psycopg

    from safesquid_tw.reporting import pgstore

    monkeypatch.setattr(pgstore, "RETRY_CONNECT_AFTER", 0.0)  # reconnect at the next batch
    store = pgstore.PostgresReportStore(postgres_server.new_database(), writers=1)
    master = Master(tmp_path / "master", clock)
    master.reports, master.plane.ingest = store, store.ingest
    try:
        slave = Slave(tmp_path, clock, "slave1")
        link = slave.connect(master)
        for i in range(10):
            slave.spool.append(_record(i))
        for _ in range(6):
            clock.advance(0.5)
            link.flush()
        assert store.count() == 10

        # The database goes away: its writer connection is cut and no new one can be made.
        with psycopg.connect(store.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'safesquid-tw' AND pid <> pg_backend_pid()")

        def refused(*args, **kwargs):
            raise psycopg.OperationalError("connection refused")

        with monkeypatch.context() as down:
            down.setattr(pgstore.psycopg, "connect", refused)
            for i in range(10, 25):
                slave.spool.append(_record(i))
            for _ in range(6):
                clock.advance(0.5)
                link.flush()
            assert slave.spool.backlog_records == 15  # not acknowledged: kept for the next attempt
            assert store.count() == 10

        # Back: the store reconnects and the slave's next attempts get through.
        for _ in range(6):
            clock.advance(0.5)
            link.flush()
        assert slave.spool.backlog_records == 0
        assert store.count() == 25
        names = [(r["segment"], r["seq"]) for r in store.search(start=0, end=2e9, limit=100)]
        assert len(names) == len(set(names)) == 25  # none doubled
    finally:
        store.close()


def test_dropped_records_reported_by_a_slave_reach_the_master(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "slave1", keepalive=1.0)
    link = slave.connect(master)
    slave.spool.dropped_records = 42
    clock.advance(1)
    link.flush()
    rec = master.record("slave1")
    assert rec.dropped_records == 42
    assert any("42 access records dropped" in w for w in rec.warnings(1))
    assert master.reports.dropped_totals() == {"slave1": 42}


# --------------------------------------------------------------------------------------------
# The contract on the wire
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, args, complaint",
    [
        ("ship_log_batch", ("seven", 0, [b"x"]), "segment"),
        ("ship_log_batch", (1, 0, []), "records"),
        ("ship_log_batch", (1, 0, [b"x" * (wire.MAX_LOG_RECORD_BYTES + 1)]), "records"),
        ("policy_chunk", (1, -1), "index"),
        ("policy_chunk", (99, 0), "no longer current"),
        ("policy_applied", (1, "yes", ""), "ok"),
        ("report_status", ({"policy_version": 1},), "uptime"),
        ("shutdown", (), "shutdown"),
    ],
)
def test_the_avatar_refuses_calls_that_break_the_contract(master, clock, tmp_path, method, args, complaint):
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    failures = []
    slave.client.avatar.callRemote(method, *args).addErrback(failures.append)
    link.flush()
    assert len(failures) == 1 and complaint in failures[0].getErrorMessage(), failures
    # The connection survives a refused call.
    answers = []
    slave.client.avatar.callRemote("ping").addBoth(answers.append)
    link.flush()
    assert answers == [None] and master.record("slave1").connected


def test_the_gate_offers_nothing_before_the_key_proof(master, clock, tmp_path):
    slave = Slave(tmp_path, clock, "probe")
    tls = TLSMemoryBIOFactory(slave.client.creator, True, slave.client.factory, clock=clock)
    client_tls, _server, pump = iosim.connectedServerAndClient(
        lambda: master.port.buildProtocol(MASTER_ADDRESS), lambda: tls.buildProtocol(MASTER_ADDRESS),
        greet=True, clock=clock)
    root = client_tls.wrappedProtocol.remoteForName("root")
    failures = []
    root.callRemote("prove", b"\0" * 32, slave_side.Mind(slave.client)).addErrback(failures.append)
    root.callRemote("policy_manifest").addErrback(failures.append)
    pump.flush()
    assert len(failures) == 2
    assert "prove before hello" in failures[0].getErrorMessage()
    assert failures[1].check(pb.NoSuchMethod) or "policy_manifest" in failures[1].getErrorMessage()
    assert master.plane.avatars == {}
