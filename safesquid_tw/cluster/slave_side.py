"""The slave's end of the control plane.

One TLS connection to the master's portal port (ALPN picks the control plane) is kept up,
reconnecting with back-off. Each connection logs in with the key proof, compares policy
versions and fetches what it lacks, starts shipping access records, and sends status reports that
double as keepalives. The master pushes "version N exists" and tasks through the slave's `Mind`.
Nothing on the request path ever waits for any of this: the proxy always runs on the policy the
store holds (from the cache at start-up).
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.spread import pb
from zope.interface import implementer

from safesquid_tw.accesslog.spool import Batch
from safesquid_tw.cluster import wire
from safesquid_tw.icap import status as antivirus_status
from safesquid_tw.cluster.jellysafety import ClusterBroker, ClusterClientFactory
from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion, SlaveKeyProof
from safesquid_tw.cluster.shipper import LogShipper
from safesquid_tw.cluster.tlsconfig import MasterClientCreator, MasterTrust, channel_binding, master_fingerprint
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyStore

log = Logger()


class SlaveBroker(ClusterBroker):
    """A broker that says when it is ready for calls: TLS handshake and PB dialect agreed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ready: defer.Deferred = defer.Deferred()

    def connectionReady(self) -> None:
        super().connectionReady()
        if not self.ready.called:
            self.ready.callback(None)

    def connectionLost(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        super().connectionLost(reason)


class SlaveClientFactory(ClusterClientFactory):
    protocol = SlaveBroker


class Mind(pb.Referenceable):
    """What the master may call on this slave."""

    def __init__(self, client: "ClusterClient") -> None:
        self.client = client

    @wire.checked("mind")
    def remote_ping(self):
        return None

    @wire.checked("mind")
    def remote_policy_changed(self, version):
        self.client.sync_soon(f"master announced version {version}")
        return None

    @wire.checked("mind")
    def remote_task(self, task):
        return self.client.run_task(task)

    @wire.checked("mind")
    def remote_inspection_ca_changed(self, fingerprint):
        for sync in self.client.extra_syncs:
            sync("the master replaced its inspection CA")
        return None


@implementer(IStreamClientEndpoint)
class _LoggingEndpoint:
    """The way to the master, saying once per outage (not once per retry) why it is unreachable."""

    def __init__(self, endpoint, master: str) -> None:
        self._endpoint = endpoint
        self._master = master
        self._last: str | None = None

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        d.addErrback(self._failed)
        return d

    def _failed(self, reason):
        if reason.check(defer.CancelledError):
            return reason  # the node is stopping: nothing to tell
        message = reason.getErrorMessage()
        if message != self._last:
            log.warn("cannot reach the master at {master}: {why}; retrying with back-off",
                     master=self._master, why=message)
            self._last = message
        return reason

    def reached(self) -> None:
        self._last = None


RETRY_CAP = 2.5
CHUNKS_IN_FLIGHT = 4  # policy chunk calls outstanding at once (each at most wire.MAX_CHUNK_BYTES)


class ClusterClient(MultiService):
    def __init__(
        self,
        *,
        reactor,
        master: str,
        key: ClusterKey,
        version: NodeVersion,
        node_name: str,
        trust: MasterTrust,
        store: PolicyStore,
        state: NodeState,
        shipper: LogShipper,
        status_extra: Callable[[], dict],
        on_task: Callable[[str], str],
        keepalive: float = 10.0,
        poll_interval: float = 60.0,
        source_address: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`source_address`: the local address the control-plane connection leaves from (what
        the master's allow list sees). `wall_clock`: the time of day /health and the master are
        told (connected since, this node's clock)."""
        super().__init__()
        self.reactor = reactor
        self.wall_clock = wall_clock
        self.master = master
        self.key = key
        self.version = version
        self.node_name = node_name
        self.trust = trust
        self.store = store
        self.state = state
        self.shipper = shipper
        self.status_extra = status_extra
        self.on_task = on_task
        self.keepalive = keepalive
        self.poll_interval = poll_interval
        self.avatar = None
        # Whether the master takes a batch as its joined lines (ship_log_lines); found out per
        # connection, since an older master answers that call with "no such method".
        self._ship_lines = True
        self.connected_since: float | None = None
        self.disconnected_since: float | None = wall_clock()  # not connected yet, since start
        self._syncing: defer.Deferred | None = None
        self._sync_again = False
        self._timers: list = []
        host, _, port = master.rpartition(":")
        host = host.strip("[]")
        self.creator = MasterClientCreator(trust, master)
        kwargs = {"bindAddress": (source_address, 0)} if source_address else {}
        endpoint = _LoggingEndpoint(
            endpoints.wrapClientTLS(self.creator, endpoints.HostnameEndpoint(reactor, host, int(port), **kwargs)),
            master,
        )
        self._endpoint = endpoint
        self.factory = SlaveClientFactory()
        # Capped at 2.5 s plus up to 1 s of jitter: after a master restart every slave is back
        # within 5 s, and a fleet's reconnections spread over that second.
        self.retry_delays = backoffPolicy(initialDelay=0.5, maxDelay=RETRY_CAP, factor=2.0)
        self._running: defer.Deferred | None = None
        self._stopping = False
        self._sleep: defer.Deferred | None = None
        self._connecting: defer.Deferred | None = None
        self._broker = None
        # Further things fetched whenever the policy is compared (connect, poll, reload task):
        # callables taking the reason, e.g. cluster.ca_sync.SlaveCASync.sync_soon.
        self.extra_syncs: list[Callable[[str], None]] = []

    # -- the connection loop ------------------------------------------------------------------
    # Twisted's ClientService cannot take a connection that is refused *after* it was made (its
    # state machine has no transition for the loss that follows a failed prepareConnection), and
    # a refused login is exactly that. So the loop is ours: connect, log in, serve until the
    # connection ends, wait (with back-off after failures), again.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._running = defer.ensureDeferred(self._connection_loop())
        self._running.addErrback(lambda f: log.failure("the connection loop to the master ended", f))

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()  # a stop during a connection attempt must not wait for it
        if self._broker is not None and self._broker.transport is not None:
            self._broker.transport.loseConnection()
        return self._running

    async def _connection_loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                self._connecting = self._endpoint.connect(self.factory)
                broker = await self._connecting
            except Exception:
                failures += 1  # _LoggingEndpoint said why, once per outage
            else:
                self._broker = broker
                if self._stopping:  # stopped while connecting
                    _drop(broker)
                    return
                lost: defer.Deferred = defer.Deferred()
                broker.notifyOnDisconnect(lambda: lost.called or lost.callback(None))
                try:
                    await self._login(broker)
                except Exception:
                    failures += 1
                else:
                    failures = 0
                if self._stopping:  # stopped while logging in: nobody else closes this one
                    _drop(broker)
                await lost
                self._broker = None
            if self._stopping:
                return
            delay = self.retry_delays(max(failures, 1))
            if failures:
                log.info("next attempt to reach the master at {master} in {delay:.1f} s (attempt {n})",
                         master=self.master, delay=delay, n=failures + 1)
            self._sleep = defer.Deferred()
            call = self.reactor.callLater(delay, self._sleep.callback, None)
            self._sleep.addErrback(lambda f: call.cancel() if call.active() else None)
            await self._sleep

    # -- connecting -----------------------------------------------------------------------
    def _login(self, broker: SlaveBroker) -> defer.Deferred:
        return defer.ensureDeferred(self._login_async(broker))

    async def _login_async(self, broker: SlaveBroker) -> None:
        try:
            await broker.ready.addTimeout(max(self.keepalive * 3, 5.0), self.reactor)
            root = broker.remoteForName("root")
            proof = SlaveKeyProof(self.key, self.version, self.node_name, channel_binding(broker.transport, "slave"))
            limit = max(self.keepalive * 3, 5.0)  # a master that stopped answering is not waited for
            hello = root.callRemote("hello", *proof.hello_args()).addTimeout(limit, self.reactor)
            challenge = wire.check_result("gate", "hello", await hello)
            prove = root.callRemote("prove", proof.answer(challenge), Mind(self)).addTimeout(limit, self.reactor)
            answer = wire.check_result("gate", "prove", await prove)
            proof.verify_master(answer["proof"])
            self.trust.confirm(master_fingerprint(broker.transport, "slave"))
        except pb.RemoteError as e:
            log.error("the master at {master} refused this node: {why}", master=self.master, why=str(e))
            _drop(broker)
            raise
        except Exception as e:
            log.error("cannot log in to the master at {master}: {why}", master=self.master, why=str(e) or repr(e))
            _drop(broker)
            raise
        self.avatar = answer["avatar"]
        self._ship_lines = True
        self.connected_since = self.wall_clock()
        self._endpoint.reached()
        broker.notifyOnDisconnect(lambda: self._lost(broker))
        log.info("connected to the master at {master}", master=self.master)
        self.shipper.set_sender(self._ship)
        self._start_timers()
        self.sync_soon("connected")
        self.report_status()

    def _lost(self, broker) -> None:
        self.avatar = None
        self.disconnected_since = self.wall_clock()
        self.shipper.set_sender(None)
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers = []
        log.warn(
            "lost the connection to the master at {master}; serving policy version {version} meanwhile",
            master=self.master, version=self.state.policy_version,
        )

    def _start_timers(self) -> None:
        self._timers = [
            self.reactor.callLater(self.keepalive, self._keepalive_tick),
            self.reactor.callLater(self.poll_interval, self._poll_tick),
        ]

    def _keepalive_tick(self) -> None:
        if self.avatar is None:
            return
        self.report_status()
        self._timers[0] = self.reactor.callLater(self.keepalive, self._keepalive_tick)

    def _poll_tick(self) -> None:
        if self.avatar is None:
            return
        self.sync_soon("periodic check")
        self._timers[1] = self.reactor.callLater(self.poll_interval, self._poll_tick)

    def _call(self, method: str, *args, timeout: float | None = None) -> defer.Deferred:
        avatar = self.avatar
        if avatar is None:
            return defer.fail(ConnectionError("not connected to the master"))
        try:
            d = avatar.callRemote(method, *args)
        except pb.DeadReferenceError as e:
            return defer.fail(e)
        d.addTimeout(timeout or max(self.keepalive * 2, 5.0), self.reactor)
        d.addErrback(self._call_failed, method)
        return d

    def _call_failed(self, reason, method: str):
        if reason.check(defer.TimeoutError):
            # The master stopped answering: drop the connection, the service reconnects.
            broker = getattr(self.avatar, "broker", None)
            if broker is not None and broker.transport is not None:
                broker.transport.abortConnection()
        return reason

    # -- status ---------------------------------------------------------------------------
    def master_health(self) -> dict:
        """The "master" section of this slave's /health JSON (it never changes the status code)."""
        connected = self.avatar is not None
        return {
            "address": self.master,
            "connected": connected,
            "since": self.connected_since if connected else self.disconnected_since,
        }

    def report_status(self) -> None:
        state = self.state
        spool = self.shipper.spool
        # With workers the node's spool is theirs and its own, merged (workers/pool.py).
        merged = state.health_parts["spool"]() if "workers" in state.health_parts else None
        extra = self.status_extra()
        status = {
            "policy_version": state.policy_version or 0,
            "uptime": float(state.uptime_s or 0.0),
            "spool_records": merged["backlog_records"] if merged else spool.backlog_records,
            "spool_bytes": merged["backlog_bytes"] if merged else spool.backlog_bytes,
            "counters": {
                "dropped_records": merged["dropped_records"] if merged else spool.dropped_records,
                "requests_total": int(extra.get("requests_total", 0)),
            },
            "clock": self.wall_clock(),
            "draining": state.draining,
            "ready": state.ready,
            "requests_per_second": float(extra.get("requests_per_second", 0.0)),
        }
        if state.policy_digest:
            status["policy_digest"] = state.policy_digest
        if state.policy_source:
            status["policy_source"] = state.policy_source
        if extra.get("directory"):
            status["directory"] = extra["directory"]
        workers = state.health_parts.get("workers")
        if workers is not None:
            status["workers"] = [
                {"pid": int(w["pid"] or 0), "state": str(w["state"])[:16], "policy_version": w["policy_version"] or 0,
                 "connections": int(w["connections"])}
                for w in workers()[:wire.MAX_WORKERS]
            ]
        writer = getattr(self.shipper, "writer", None)
        if writer is not None and not writer.writable:
            status["detail"] = f"spool not writable: {writer.reason}"[:1000]
        elif merged and not merged["writable"]:
            status["detail"] = f"spool not writable: {merged['reason']}"[:1000]
        if state.antivirus is not None:
            antivirus = antivirus_status.to_wire(state.antivirus())
            if antivirus:
                status["antivirus"] = antivirus
        self._call("report_status", status).addErrback(lambda f: None)

    # -- policy ---------------------------------------------------------------------------
    def recheck(self) -> None:
        """SIGHUP: compare policy versions with the master now (or as soon as it is back)."""
        if self.avatar is None:
            log.info("not connected to the master at {master}: the policy is checked when it answers",
                     master=self.master)
            return
        self.sync_soon("SIGHUP")

    def sync_soon(self, why: str) -> None:
        for sync in self.extra_syncs:
            sync(why)
        if self._syncing is not None:
            self._sync_again = True
            return
        self._syncing = defer.ensureDeferred(self._sync(why))
        self._syncing.addErrback(lambda f: log.warn("policy sync failed: {why}", why=f.getErrorMessage()))
        self._syncing.addBoth(self._sync_done)

    def _sync_done(self, _ignored) -> None:
        self._syncing = None
        if self._sync_again:
            self._sync_again = False
            self.sync_soon("another announcement arrived meanwhile")

    async def _sync(self, why: str) -> None:
        manifest_value = await self._call("policy_manifest")
        wire.check_result("avatar", "policy_manifest", manifest_value)
        version = manifest_value["version"]
        manifest = wire.BlobManifest.from_wire(manifest_value)
        digest = "sha256:" + manifest.sha256.hex()
        if self._runs(version, digest):
            return
        taken = await self._sync_change(version, digest, why)
        if taken is not False:
            return  # applied from the changed sections alone (or a newer version is being prepared)
        assembler = wire.BlobAssembler(manifest)
        # Several chunk calls in flight at a time, not one round trip per chunk: a big policy
        # is a dozen chunks or more, and a loaded master answers each after a while.
        for first in range(0, manifest.chunks, CHUNKS_IN_FLIGHT):
            indexes = range(first, min(first + CHUNKS_IN_FLIGHT, manifest.chunks))
            try:
                chunks = await defer.gatherResults([self._call("policy_chunk", version, i) for i in indexes],
                                                   consumeErrors=True)
            except defer.FirstError as e:
                e.subFailure.raiseException()
            for index, chunk in zip(indexes, chunks):
                assembler.add(index, chunk)
        try:
            # Joined, digest-checked, parsed, validated, compiled and cached in the store's worker
            # thread (a big policy's SHA-256 alone would hold up the reactor); swapped here.
            policy = await self.store.install_blob_async(assembler.result, version, source="master")
        except PolicySuperseded:
            return  # a newer version is being prepared; its sync acknowledges that one
        except (PolicyError, OSError) as e:
            log.error("refused policy version {version} from the master: {why}", version=version, why=str(e))
            await self._call("policy_applied", version, False, str(e)[:4000])
            return
        log.info("policy version {version} ({digest}) from the master is in force ({why})",
                 version=version, digest=policy.digest, why=why)
        await self._call("policy_applied", version, True, "")
        self.report_status()

    async def _sync_change(self, version: int, digest: str, why: str) -> bool | None:
        """Take the version as the sections changed since the one this slave runs, when the
        master has that change (policy/sectionchange.py): nothing of 3 MB crosses the wire or
        gets decoded. False: fetch the whole version instead (no change at hand, an older master,
        or a change that does not make the announced digest)."""
        current = self.store.current
        if current is None or not current.digest.startswith("sha256:"):
            return False
        base = bytes.fromhex(current.digest[len("sha256:"):])
        del current  # not kept across the awaits: the replaced version is freed in pieces
        try:
            change = await self._call("policy_change", version, base)
            wire.check_result("avatar", "policy_change", change)
        except Exception as e:
            log.debug("no policy change from the master ({why}); fetching the whole version", why=str(e))
            return False
        if not change:
            return False
        try:
            policy = await self.store.install_change_async(change, version, digest, source="master")
        except PolicySuperseded:
            return None
        except Exception as e:
            log.info("the changed sections of policy version {version} did not apply ({why}); "
                     "fetching the whole version", version=version, why=str(e)[:500])
            return False
        log.info("policy version {version} ({digest}) from the master is in force ({why}; changed sections only)",
                 version=version, digest=policy.digest, why=why)
        await self._call("policy_applied", version, True, "")
        self.report_status()
        return True

    def _runs(self, version: int, digest: str) -> bool:
        # Not a local of `_sync`: that coroutine lives on after the swap, and the version it
        # replaced must not stay referenced there (it is freed in pieces in the policy thread).
        current = self.store.current
        return current is not None and current.version == version and current.digest == digest

    # -- tasks and logs -------------------------------------------------------------------
    def run_task(self, task: str) -> str:
        log.info("task {task} from the master", task=task)
        result = self.on_task(task)
        if task == "reload":
            self.sync_soon("reload task")
        self.reactor.callLater(0, self.report_status)
        return result

    def _ship(self, batch: Batch) -> defer.Deferred:
        lines = wire.join_log_lines(batch.records) if self._ship_lines else None
        if lines is None:
            return self._call("ship_log_batch", batch.segment, batch.first_seq, batch.records, timeout=60.0)
        d = self._call("ship_log_lines", batch.segment, batch.first_seq, lines, timeout=60.0)
        d.addErrback(self._lines_refused, batch)
        return d

    def _lines_refused(self, reason, batch: Batch):
        """A master from before ship_log_lines: ship this batch, and the next ones, as lists."""
        if not reason.check(pb.NoSuchMethod, "twisted.spread.flavors.NoSuchMethod"):
            return reason
        self._ship_lines = False
        log.info("the master takes access records only as lists: shipping them so")
        return self._call("ship_log_batch", batch.segment, batch.first_seq, batch.records, timeout=60.0)


def _drop(broker) -> None:
    """A failed login closes its own connection, so the client service starts its back-off clean."""
    transport = getattr(broker, "transport", None)
    if transport is not None:
        transport.abortConnection()
