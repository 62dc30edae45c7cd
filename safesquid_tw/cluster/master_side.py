"""The master's end of the control plane: admitting slaves, pushing policy, taking their logs.

Each control-plane connection gets a `Gate` (the PB root object). A slave says `hello` (its
version and name), then `prove`s it holds the activation key; only then does it get its
`SlaveAvatar`, through which it fetches policy in chunks, reports its status and ships access
records. The master keeps a remote reference to the slave's own object (its "mind") to tell it
about new policy versions, send tasks and check that it is still alive.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from safesquid_tw.cluster import wire
from safesquid_tw.util.threads import ThreadRunner, reactor_pool
from safesquid_tw.icap import status as antivirus_status
from safesquid_tw.cluster.keyproof import (
    ClusterKey,
    IncompatibleVersion,
    KeyProofFailed,
    MasterKeyProof,
    NodeVersion,
)
from safesquid_tw.cluster.tlsconfig import ChannelBindingUnavailable, channel_binding
from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.policy.codec import canonical_bytes
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.sectionchange import SectionChange
from safesquid_tw.policy.store import PolicyStore

log = Logger()


class ClusterRefused(pb.Error):
    """Sent to a slave the master will not admit; pb.Error travels without a traceback."""


class PolicyPublication:
    """The current policy cut into wire chunks, made once per version."""

    def __init__(self, policy: Policy, data: bytes | None = None, change: SectionChange | None = None) -> None:
        """`data`: the document's canonical bytes when the store has them already (made in its
        worker thread), so the reactor does not serialise a big policy again. `change`: the
        version as the sections changed since the one before (policy/sectionchange.py)."""
        self.version = policy.version
        self.digest = policy.digest
        self.change = change if change is not None and change.digest == policy.digest else None
        manifest, self.chunks = wire.split_blob(data if data is not None else canonical_bytes(policy.document))
        self.manifest = dict(manifest.to_wire(), version=policy.version)


class ControlPlane:
    """Everything the master's PB side shares between connections."""

    def __init__(
        self,
        *,
        reactor,
        key: ClusterKey,
        version: NodeVersion,
        store: PolicyStore,
        registry: SlaveRegistry,
        ingest: Callable[[str, int, int, list[bytes]], object] | None,
        record_dropped: Callable[[str, int], None] | None = None,
        keepalive: float = 10.0,
        guard=None,
        in_thread: ThreadRunner = reactor_pool,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.reactor = reactor
        self.in_thread = in_thread  # where report ingest (SQLite/PostgreSQL) runs
        self.wall_clock = wall_clock  # compared with each slave's clock
        self.guard = guard  # guard.ControlGuard: refusal counters, per-source log and proof limits
        self.key = key
        self.version = version
        self.store = store
        self.registry = registry
        self.ingest = ingest
        self.record_dropped = record_dropped
        self.keepalive = keepalive
        self.publication: PolicyPublication | None = None
        self.avatars: dict[str, SlaveAvatar] = {}
        # For metrics (plain values, read at scrape time): when each version was announced
        # (reactor seconds), each node's last push latency (announce -> applied, seconds) and
        # the access records ingested from each node since start.
        self.announced_at: dict[int, float] = {}
        self.push_latency: dict[str, float] = {}
        self.ingested_records: dict[str, int] = {}
        store.add_observer(self.policy_changed)
        if store.current is not None:
            self.publication = PolicyPublication(store.current)

    # -- admission ------------------------------------------------------------------------
    def refusal_for_address(self, address: str) -> str | None:
        policy = self.store.current
        section = (policy.document.get("access_restriction") or {}) if policy is not None else {}
        if not section.get("slave_allow_enabled"):
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"address {address!r} cannot be checked against the allow list"
        for network in section.get("slave_allow", ()):
            if ip in ipaddress.ip_network(network, strict=False):
                return None
        return f"address {address} is not on the master's allow list (Access Restriction, slave_allow)"

    # -- policy ---------------------------------------------------------------------------
    def policy_changed(self, policy: Policy) -> None:
        current = self.store.current is policy
        data = self.store.current_bytes if current else None
        self.publication = PolicyPublication(policy, data, self.store.current_change if current else None)
        self.announced_at = {policy.version: self.reactor.seconds()}
        for name, avatar in list(self.avatars.items()):
            avatar.notify_policy(policy.version)
        if self.avatars:
            log.info(
                "policy version {version} pushed to {count} slave(s): {names}",
                version=policy.version, count=len(self.avatars), names=", ".join(sorted(self.avatars)),
            )


@implementer(pb.IPBRoot)
class ControlRoot:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def rootObject(self, broker):
        return Gate(self.plane, broker)


class Gate(pb.Referenceable):
    """Before login: version check, allow list, the key proof, then the avatar."""

    def __init__(self, plane: ControlPlane, broker) -> None:
        self.plane = plane
        self.broker = broker
        self.proof: MasterKeyProof | None = None
        self.product = ""

    def _peer_ip(self) -> str:
        try:
            return self.broker.transport.getPeer().host
        except Exception:
            return "?"

    def _refuse(self, node: str, why: str, kind: str = "refused") -> None:
        address = self._peer_ip()
        message = f"refused slave {node} from {address}: {why}"
        guard = self.plane.guard
        if guard is not None:
            guard.refuse(kind, address, message)  # one line per source and window
        else:
            log.warn("{message}", message=message)
        # Drop the connection shortly after the answer leaves: a refused peer gets one try.
        self.plane.reactor.callLater(0.5, self._drop)
        raise ClusterRefused(why)

    def _drop(self) -> None:
        transport = self.broker.transport
        if transport is not None:
            transport.loseConnection()

    @wire.checked("gate")
    def remote_hello(self, protocol, product, node, nonce):
        if self.proof is not None:
            self._refuse(node, "one key proof per connection", "second_proof")
        guard = self.plane.guard
        if guard is not None:
            wait = guard.proofs_blocked(self._peer_ip())
            if wait is not None:
                self._refuse(node, f"too many failed key proofs from this address; try again in {wait:.0f} s",
                             "throttled")
        why = self.plane.refusal_for_address(self._peer_ip())
        if why is not None:
            self._refuse(node, why)
        self.product = product
        try:
            binding = channel_binding(self.broker.transport, "master")
            self.proof = MasterKeyProof(self.plane.key, self.plane.version, binding)
            return self.proof.challenge(protocol, product, node, nonce)
        except IncompatibleVersion as e:
            self._refuse(node, str(e))
        except (KeyProofFailed, ChannelBindingUnavailable) as e:
            self._refuse(node, str(e))

    @wire.checked("gate")
    def remote_prove(self, proof, mind):
        if self.proof is None:
            self._refuse("?", "prove before hello")
        try:
            master_proof = self.proof.verify(proof)
        except KeyProofFailed as e:
            if self.plane.guard is not None:
                self.plane.guard.proof_failed(self._peer_ip())
            self._refuse(self.proof.slave_name or "?", f"wrong activation key ({e})", "failed_proof")
        name = self.proof.slave_name
        return defer.ensureDeferred(self._admit(name, mind, master_proof))

    async def _admit(self, name: str, mind, master_proof: bytes) -> dict:
        plane = self.plane
        existing = plane.avatars.get(name)
        if existing is not None:
            if await existing.is_alive():
                self._refuse(
                    name,
                    f"node name clash: a slave named {name!r} is already connected from "
                    f"{existing.address}; give this node its own --node-name",
                )
            existing.disconnect(f"replaced by a new connection from {self._peer_ip()}")
        avatar = SlaveAvatar(plane, name, mind, self.broker, self._peer_ip(), self.product)
        avatar.attach()
        login_completed = getattr(self.broker, "login_completed", None)
        if login_completed is not None:
            login_completed()
        return {"proof": master_proof, "avatar": avatar}


class SlaveAvatar(pb.Referenceable):
    """One authenticated slave: what it may call, and how the master reaches it."""

    def __init__(self, plane: ControlPlane, name: str, mind, broker, address: str, product: str = "") -> None:
        self.plane = plane
        self.product = product
        self.name = name
        self.mind = mind
        self.broker = broker
        self.address = address
        self.gone = False
        self._keepalive_call = None
        self._last_heard = plane.reactor.seconds()

    # -- lifetime -------------------------------------------------------------------------
    def attach(self) -> None:
        plane = self.plane
        plane.avatars[self.name] = self
        plane.registry.attach(self.name, self, address=self.address, product_version=self.product)
        self.broker.notifyOnDisconnect(self._disconnected)
        log.info("slave {node} connected from {address}", node=self.name, address=self.address)
        self._schedule_keepalive()

    def _disconnected(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        plane = self.plane
        if plane.avatars.get(self.name) is self:
            del plane.avatars[self.name]
        plane.registry.detach(self.name, self)
        log.info("slave {node} ({address}) disconnected", node=self.name, address=self.address)

    def disconnect(self, reason: str) -> None:
        log.warn("disconnecting slave {node} ({address}): {reason}", node=self.name, address=self.address, reason=reason)
        transport = self.broker.transport
        if transport is not None:
            transport.abortConnection() if hasattr(transport, "abortConnection") else transport.loseConnection()
        self._disconnected()

    def _heard(self) -> None:
        self._last_heard = self.plane.reactor.seconds()
        self.plane.registry.seen(self.name)

    # -- keepalive ------------------------------------------------------------------------
    def _schedule_keepalive(self) -> None:
        self._keepalive_call = self.plane.reactor.callLater(self.plane.keepalive, self._keepalive)

    def _keepalive(self) -> None:
        if self.gone:
            return
        silent = self.plane.reactor.seconds() - self._last_heard
        if silent > 3 * self.plane.keepalive:
            self.disconnect(f"no answer for {silent:.0f} s: marked gone")
            return
        d = self._call("ping", timeout=self.plane.keepalive)
        d.addCallbacks(lambda _: self._heard(), lambda _: None)
        self._schedule_keepalive()

    def _call(self, method: str, *args, timeout: float = 10.0) -> defer.Deferred:
        try:
            d = self.mind.callRemote(method, *args)
        except pb.DeadReferenceError as e:
            return defer.fail(e)
        d.addTimeout(timeout, self.plane.reactor)
        return d

    def is_alive(self) -> defer.Deferred:
        d = self._call("ping", timeout=3.0)
        d.addCallbacks(lambda _: True, lambda _: False)
        return d

    # -- master -> slave ------------------------------------------------------------------
    def notify_policy(self, version: int) -> None:
        d = self._call("policy_changed", version)
        d.addErrback(
            lambda f: log.warn("telling {node} about version {v} failed: {why}", node=self.name, v=version,
                               why=f.getErrorMessage())
        )

    def send_task(self, task: str) -> defer.Deferred:
        log.info("task {task} sent to {node}", task=task, node=self.name)
        d = self._call("task", task)
        d.addCallback(lambda result: wire.check_result("mind", "task", result))
        return d

    # -- slave -> master ------------------------------------------------------------------
    @wire.checked("avatar")
    def remote_ping(self):
        self._heard()
        return None

    @wire.checked("avatar")
    def remote_report_status(self, status):
        self._heard()
        rec = self.plane.registry.record(self.name)
        now = self.plane.reactor.seconds()
        rec.backlog_records = status["spool_records"]
        counters = status.get("counters", {})
        dropped = counters.get("dropped_records", 0)
        if dropped > rec.dropped_records:
            log.warn("slave {node} dropped {n} access records in all while the master was away",
                     node=self.name, n=dropped)
            if self.plane.record_dropped is not None:
                self.plane.in_thread(self.plane.record_dropped, self.name, dropped).addErrback(
                    lambda f: log.failure("recording dropped records", f))
        rec.dropped_records = dropped
        rec.requests_total = counters.get("requests_total", rec.requests_total)
        rec.requests_per_second = float(status.get("requests_per_second", 0.0))
        if "clock" in status:
            rec.clock_offset = round(status["clock"] - self.plane.wall_clock(), 3)
        rec.draining = bool(status.get("draining", False))
        detail = status.get("detail") or None
        rec.spool_problem = detail if detail and detail.startswith("spool") else None
        rec.ready = bool(status.get("ready", False))
        rec.directory = status.get("directory")
        version = status["policy_version"] or None
        if version != rec.policy_version:
            rec.policy_applied_at = now
        rec.policy_version = version
        rec.policy_digest = status.get("policy_digest")
        rec.policy_source = status.get("policy_source")
        rec.antivirus = antivirus_status.from_wire(status.get("antivirus", []))
        rec.workers = [{**w, "policy_version": w["policy_version"] or None} for w in status.get("workers", [])]
        return None

    @wire.checked("avatar")
    def remote_policy_manifest(self):
        self._heard()
        publication = self.plane.publication
        if publication is None:
            raise ClusterRefused("the master has no policy yet")
        return publication.manifest

    @wire.checked("avatar")
    def remote_policy_chunk(self, version, index):
        publication = self.plane.publication
        if publication is None or publication.version != version:
            raise ClusterRefused(f"version {version} is no longer current; ask for the manifest again")
        if index >= len(publication.chunks):
            raise ClusterRefused(f"version {version} has no chunk {index}")
        return publication.chunks[index]

    @wire.checked("avatar")
    def remote_policy_change(self, version, base):
        """The current version as the sections changed since `base`, or b"" when this master has
        no such change (the slave then fetches the whole version in chunks)."""
        self._heard()
        publication = self.plane.publication
        if publication is None or publication.version != version:
            raise ClusterRefused(f"version {version} is no longer current; ask for the manifest again")
        change = publication.change
        if change is None or change.base != "sha256:" + base.hex() or len(change.data) > wire.MAX_CHUNK_BYTES:
            return b""
        return change.data

    @wire.checked("avatar")
    def remote_policy_applied(self, version, ok, detail):
        self._heard()
        rec = self.plane.registry.record(self.name)
        if ok:
            rec.policy_version = version
            rec.policy_applied_at = self.plane.reactor.seconds()
            rec.policy_error = None
            announced = self.plane.announced_at.get(version)
            if announced is not None:
                self.plane.push_latency[self.name] = self.plane.reactor.seconds() - announced
            log.info("slave {node} applied policy version {version}", node=self.name, version=version)
        else:
            rec.policy_error = f"version {version}: {detail}"
            log.error("slave {node} refused policy version {version}: {why}", node=self.name, version=version, why=detail)
        return None

    @wire.checked("avatar")
    def remote_inspection_ca_fingerprint(self):
        from safesquid_tw.cluster.ca_sync import master_ca_fingerprint

        self._heard()
        return master_ca_fingerprint(self.plane)

    @wire.checked("avatar")
    def remote_inspection_ca(self):
        from safesquid_tw.cluster.ca_sync import master_ca_bundle

        self._heard()
        return master_ca_bundle(self.plane, self.name)

    @wire.checked("avatar")
    def remote_ship_log_batch(self, segment, first_seq, records):
        self._heard()
        ingest = self.plane.ingest
        if ingest is None:
            raise ClusterRefused("this master keeps no reports")
        d = self.plane.in_thread(ingest, self.name, segment, first_seq, records)
        d.addCallback(self._ingested)
        return d

    @wire.checked("avatar")
    def remote_ship_log_lines(self, segment, first_seq, lines):
        self._heard()
        ingest = self.plane.ingest
        if ingest is None:
            raise ClusterRefused("this master keeps no reports")
        d = self.plane.in_thread(ingest, self.name, segment, first_seq, wire.split_log_lines(lines))
        d.addCallback(self._ingested)
        return d


    def _ingested(self, result):
        counts = self.plane.ingested_records
        counts[self.name] = counts.get(self.name, 0) + result.inserted
        return result.inserted

