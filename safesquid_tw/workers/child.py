"""One worker process: the forward proxy alone, on sockets its node bound and handed down.

Everything that must be one per node (control-plane link, policy store and cache, shipper,
portal, /health, metrics) stays in the parent; a worker gets its policy versions and tasks over
stdin and sends its access records, policy acknowledgements and counts over stdout
(workers/frames.py). Its event log goes to stderr, which the parent logs under the worker's pid.

Each worker writes its own access records to its own durable spool (workers/spools.py) in the
reactor turn their requests finished in, as one process does; the parent ships every worker's
sealed segments. The records it also sends the parent feed the node's access.log and counters.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.config import Limits, NodeConfig
from safesquid_tw.policy.applier import POLICY_SWITCH_INTERVAL
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.heapfreeze import HeapFreezer
from safesquid_tw.policy.release import release_in_pieces
from safesquid_tw.proxy import leanaccept
from safesquid_tw.workers.inlinechange import compiles_inline
from safesquid_tw.workers.policydelta import NeedWholeVersion, compile_message, merge_waiting
from safesquid_tw.util.threads import ThreadRunner, pool_runner
from safesquid_tw.workers.frames import FramedStdio, decode_large

log = Logger()

STATUS_INTERVAL = 1.0  # seconds between the counts a worker sends its parent
SEAL_INTERVAL = 0.5  # how often the worker considers sealing its open segment for the node to ship
SEAL_AFTER = 1.0  # seal once no record came for this long, or at once when nothing sealed waits


def config_to_json(config: NodeConfig) -> dict[str, Any]:
    """What a worker needs of the node's settings. It goes on the worker's command line, which any
    local user may read: what a worker has no use for, and might hold a secret (a database URL
    with a password), is left out."""
    needed = attrs.evolve(config, report_store="sqlite", report_read_url=None, report_store_password_file=None,
                          activation_key_file=None, metrics_token_file=None, master=None)
    return attrs.asdict(needed, recurse=True)


def config_from_json(data: dict[str, Any]) -> NodeConfig:
    fields = dict(data)
    fields["limits"] = Limits(**fields["limits"])
    fields["more_listen"] = tuple(fields.get("more_listen", ()))
    return NodeConfig(**fields)


def record_to_json(record: AccessRecord) -> dict[str, Any]:
    return attrs.asdict(record, recurse=False)


def record_from_json(data: dict[str, Any]) -> AccessRecord:
    fields = dict(data)
    fields["dlp"] = tuple(fields.get("dlp") or ())
    fields["groups"] = tuple(fields.get("groups") or ())
    return AccessRecord(**fields)


class PolicyHolder:
    """The worker's side of the policy store: the version it serves and who follows it."""

    def __init__(self) -> None:
        self.current: Policy | None = None
        self._observers: list = []

    def add_observer(self, fn) -> None:
        self._observers.append(fn)

    def install(self, policy: Policy) -> None:
        self.current = policy
        for fn in list(self._observers):
            try:
                fn(policy)
            except Exception:
                log.failure("policy observer failed on version {version}", version=policy.version)


def compile_sent(message: dict[str, Any], current: Policy | None = None) -> Policy:
    """The version the parent sent, compiled here (a thread). The parent validated it and sends
    the canonical document it serves itself (or the sections that changed since `current`:
    workers/policydelta.py) over a length-framed local pipe, so the worker only compiles:
    validating again and re-serialising for the digest would double a big version's CPU in
    every worker (and hold the worker's GIL the longer), for nothing the pipe can lose."""
    if "frame" in message:
        # A large frame, still undecoded (frames.py): decoded here, a piece at a time.
        message = decode_large(message["frame"])
        if message["t"] != "policy":
            raise PolicyError("(worker)", f"a large {message['t']!r} frame is not a policy version")
    return compile_message(message, current)


class Worker:
    def __init__(self, reactor, config: NodeConfig, sockets: list[dict[str, Any]], slot: int = 0,
                 counts_path: str | None = None, in_thread: ThreadRunner | None = None) -> None:
        from safesquid_tw.proxy.resolver import Resolver
        from safesquid_tw.proxy.service import ProxyFactory

        self.reactor = reactor
        self.in_thread = in_thread or pool_runner(reactor)  # where policy versions are compiled
        self.config = config
        self.sockets = sockets
        self.slot = slot
        self.counts_path = counts_path  # the node's shared connection counts (workers/limits.py)
        self.spool = None  # opened in start(): workers/spools.py
        self.spool_writer = None
        self._sealer = None
        self._last_backlog = -1
        self._failures_sent = 0  # upstream failures the parent has heard of (ProxyCounters)
        self._unchanged_since = 0.0
        self.policy = PolicyHolder()
        # Freezes the heap after each swap (policy/heapfreeze.py); set by main(), the worker
        # process's own entry, and not in tests that build a Worker in their process.
        self.heap: HeapFreezer | None = None
        self.pipe = FramedStdio(self.received, self.parent_gone, self.received_large)
        limits = config.limits
        self.resolver = Resolver(reactor, threads_max=limits.dns_threads, timeout=limits.dns_timeout,
                                 ttl=limits.dns_cache_ttl)
        from safesquid_tw.assembly.proxynode import negotiate_acceptor

        self.factory = ProxyFactory(
            reactor=reactor, limits=limits, node_name=config.node_name,
            current_policy=lambda: self.policy.current, record_sink=self.send_record,
            resolver=self.resolver, negotiate=negotiate_acceptor(config),
        )
        self.policy.add_observer(lambda policy: self.factory.antivirus.configure(policy.compiled.antivirus))
        self.ports: list = []
        self.stopping = False
        self._applying: defer.Deferred | None = None
        self._pending: dict[str, Any] | None = None
        self.service = None
        self.ca_store = None
        self.listen_asked = False  # the parent said: accept once the policy it sent is in force
        self.accepting = False

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        from twisted.internet import stdio

        from safesquid_tw.proxy.service import ProxyService

        stdio.StandardIO(self.pipe, reactor=self.reactor)
        self.pipe.send({"t": "hello", "pid": os.getpid()})
        config = self.config
        self._open_spool()
        if self.counts_path:
            from safesquid_tw.workers.limits import NodeCounts

            self.factory.node_counts = NodeCounts(self.counts_path, max(1, config.workers), self.slot)
        # The service owns drain, resume and the graceful stop; its ports are the adopted ones.
        self.service = ProxyService(self.reactor, config.listen_endpoints, self.factory, self.resolver,
                                    stop_grace=0.0, drain_grace=config.drain_grace)
        self.resolver.start()
        self.factory.auth_pool.start()
        from safesquid_tw.proxy import fastdispatch

        fastdispatch.install(self.reactor)  # as ProxyService.startService does in a one-process node
        self._interception()
        self.reactor.callLater(STATUS_INTERVAL, self.send_status)

    def _open_spool(self) -> None:
        """This slot's spool: the node's promise per record (accesslog/spoolwriter.py), its memory
        bound and size cap shared out among the workers."""
        from pathlib import Path

        from safesquid_tw.accesslog.spoolwriter import SpoolWriter
        from safesquid_tw.accesslog.spool import Spool
        from safesquid_tw.util.periodic import Periodic
        from safesquid_tw.workers.spools import slot_directory

        config = self.config
        share = max(1, config.workers)
        cap = max(1, config.spool_cap_bytes // share)
        segment_bytes = max(1, min(4 << 20, cap // 4))
        self.spool = Spool(slot_directory(Path(config.state_dir), self.slot), node=config.node_name,
                           segment_bytes=segment_bytes, cap_bytes=cap)
        for problem in self.spool.problems:
            log.error("access record spool: {problem}", problem=str(problem))
        self.spool_writer = SpoolWriter(self.reactor, self.spool, fsync_interval=config.spool_fsync_interval,
                                        memory_bytes=max(1, config.spool_memory_bytes // share),
                                        in_thread=self.in_thread)
        self.spool_writer.startService()
        # Responses sent straight to a socket leave after their records are written.
        self.factory.records_due = self.spool_writer.write_due
        self.factory.after_records = self.spool_writer.after_records
        self._sealer = Periodic(SEAL_INTERVAL, self._seal_if_due, clock=self.reactor, name="worker spool seal")
        self._sealer.startService()

    def _seal_if_due(self) -> None:
        """Seal the open segment (a rename) so the node can ship it: once records stopped coming
        for a moment, or at once when nothing sealed waits (the node keeps up)."""
        spool, writer = self.spool, self.spool_writer
        now = self.reactor.seconds()
        backlog = spool.backlog_records
        if backlog != self._last_backlog:
            self._last_backlog, self._unchanged_since = backlog, now
        if backlog and writer.writable and (now - self._unchanged_since >= SEAL_AFTER or not spool.sealed_segments()):
            spool.request_seal()
            writer.write_now()

    def _delete_shipped(self, local: int) -> None:
        from twisted.internet import threads

        d = threads.deferToThread(self.spool.acknowledge, local)
        d.addErrback(lambda f: log.error("shipped spool segment {s} not deleted: {why}", s=local,
                                         why=f.getErrorMessage()))

    def accept(self) -> None:
        """Adopt the node's sockets: from now on this worker takes connections. Called once the
        first policy the parent sent is in force, so a new worker never answers without it."""
        from safesquid_tw.proxy.proxyheader import ProxyHeaderFactory, parse_networks

        if self.accepting or self.stopping:
            return
        self.accepting = True
        config = self.config
        allowed = parse_networks(config.proxy_protocol_from) if config.proxy_protocol_from else None
        for item in self.sockets:
            factory = self.factory
            if item["proxied"]:
                factory = ProxyHeaderFactory(self.factory, reactor=self.reactor, allowed=allowed,
                                             timeout=config.limits.first_byte_timeout)
            family = socket.AF_INET6 if item["family"] == 6 else socket.AF_INET
            port = self.reactor.adoptStreamPort(item["fd"], family, factory)
            one_accept_per_wakeup(port)
            leanaccept.install(port)
            os.close(item["fd"])  # adoptStreamPort duplicated it
            host = port.getHost()
            self.factory.listening.append((host.host, host.port))
            self.service.ports.append(port)
        self.service.running = True
        self.pipe.send({"t": "accepting"})

    def _interception(self) -> None:
        from pathlib import Path

        from safesquid_tw.proxy.intercept.wiring import install_interception, open_ca_store

        self.ca_store = ca_store = open_ca_store(Path(self.config.state_dir), self.config.node_name, create=False)
        mint = install_interception(self.factory, self.reactor, ca_store, self.policy,
                                    upstream_ca_file=self.config.upstream_ca_file)
        mint.startService()
        # Its threads are not daemons: left running, they would keep this process alive (and
        # the proxy's port open) after the reactor stops.
        self.reactor.addSystemEventTrigger("before", "shutdown", mint.stopService)

    # -- from the parent ------------------------------------------------------------------
    def received(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "policy":
            self._pending = merge_waiting(self._pending, message)
            if self._applying is None:
                self._apply_next()
        elif kind == "closing":
            self.factory.closing = True  # the node is stopping: close after each response
        elif kind == "drain":
            self.service.drain()
        elif kind == "resume":
            self.service.resume()
        elif kind == "hup":
            log.info("SIGHUP from the node")
        elif kind == "listen":
            self.listen_asked = True
            if self._applying is None:
                self.accept()
        elif kind == "ca":
            self._reload_ca()
        elif kind == "stop":
            self.stop()
        elif kind == "ack":
            self._delete_shipped(int(message["segment"]))

    def received_large(self, body: bytes) -> None:
        """A frame too big to decode on the reactor thread: only a whole policy version is this
        big, and it is decoded in the thread that compiles it (in pieces: frames.decode_large)."""
        self.received({"t": "policy", "frame": body})

    def _apply_next(self) -> None:
        message, self._pending = self._pending, None
        if message is None:
            self._applying = None
            if self.listen_asked:
                self.accept()
            return
        current = self.policy.current
        if current is not None and current.digest == message.get("digest") and \
                current.version == message.get("version"):
            # Already in force (a whole version sent again after a change it could not apply).
            self.pipe.send({"t": "policy", "version": current.version, "error": None})
            self._apply_next()
            return
        # A small change compiles here, on the reactor thread, in a fraction of a millisecond:
        # handing it to a thread and back cost the reactor more (workers/inlinechange.py).
        inline = compiles_inline(message)
        # As the node's own policy thread does (policy/applier.py): the reactor thread gets the
        # GIL back quickly while a big version compiles.
        saved_interval = sys.getswitchinterval()
        if not inline:
            sys.setswitchinterval(POLICY_SWITCH_INTERVAL)
        # And, with the heap freezer, no collection while it compiles: a collection runs in the
        # compiling thread holding the GIL, and a full one traversed the running policy (50 ms
        # and more); what the compile allocated is frozen with the new version instead of traversed.
        gc_paused = self.heap is not None and not inline and gc.isenabled()
        if gc_paused:
            gc.disable()
        if inline:
            self._applying = defer.maybeDeferred(compile_sent, message, self.policy.current)
        else:
            self._applying = self.in_thread(compile_sent, message, self.policy.current)

        def applied(policy: Policy) -> None:
            replaced = [self.policy.current]
            self.policy.install(policy)
            if self.heap is not None:
                self.heap.version_swapped(policy)  # after every observer: what they built is frozen too
            self.pipe.send({"t": "policy", "version": policy.version, "error": None})
            if inline:
                # All but the changed section is shared with the new version: little to free.
                replaced.clear()
            elif replaced[0] is not None:
                # Freed a piece at a time in the thread, not all at once on the reactor.
                self.in_thread(release_in_pieces, replaced).addErrback(
                    lambda failure: log.failure("freeing a replaced policy version failed", failure))
            del replaced

        def refused(failure) -> None:
            current = self.policy.current
            if failure.check(NeedWholeVersion):
                # Not a refusal: the parent sends the whole version (policydelta.py).
                self.pipe.send({"t": "policy", "version": current.version if current else None,
                                "error": None, "resend": True})
                return
            log.error("policy version {version} refused: {why}", version=message.get("version"),
                      why=failure.getErrorMessage())
            current = self.policy.current
            self.pipe.send({"t": "policy", "version": current.version if current else None,
                            "error": failure.getErrorMessage()[:1000]})

        def finished(_ignored) -> None:
            sys.setswitchinterval(saved_interval)
            if gc_paused:
                gc.enable()
            self._apply_next()

        self._applying.addCallbacks(applied, refused)
        self._applying.addBoth(finished)

    def _reload_ca(self) -> None:
        """The node's inspection CA changed (from the master, the portal): read it again."""
        from safesquid_tw.proxy.intercept.ca import CAError

        try:
            self.ca_store.load()
        except (CAError, OSError, ValueError) as e:
            log.error("the inspection CA cannot be read: {why}", why=str(e))

    def parent_gone(self) -> None:
        if not self.stopping:
            log.warn("the node closed the pipe: stopping")
            self.stop()

    # -- to the parent --------------------------------------------------------------------
    def send_record(self, record: AccessRecord) -> None:
        # Encoded once: the line goes to this worker's spool and, as it is, to the node's access.log;
        # the node's counters get the five figures they need.
        try:
            line = record.to_json_line()
        except (TypeError, ValueError) as e:
            log.error("an access record could not be encoded: {why}", why=str(e))
            return
        if self.spool_writer is not None:
            self.spool_writer.append(line)
        message = {"t": "rec", "l": line.decode("ascii"),
                   "m": [record.action, record.status, record.duration_ms, record.bytes_in, record.bytes_out]}
        failures = self.factory.counters.upstream_failures
        total = sum(failures.values())
        if total != self._failures_sent:  # with the record that saw it: /metrics is current at once
            self._failures_sent = total
            message["uf"] = dict(failures)
        self.pipe.send(message)

    def send_status(self) -> None:
        self.pipe.send({"t": "status", "connections": len(self.factory.connections),
                        "requests": self.factory.requests, "edge": self.factory.edge_counters(),
                        "antivirus": self.factory.antivirus.health(),
                        "spool": self.spool_writer.stats() if self.spool_writer is not None else None,
                        "directory": self._directory(), "uf": dict(self.factory.counters.upstream_failures)})
        if not self.stopping:
            self.reactor.callLater(STATUS_INTERVAL, self.send_status)

    def _directory(self) -> dict | None:
        from safesquid_tw.identity.watch import directory_health

        try:
            return directory_health(self.factory.current_policy)
        except Exception:  # a status report must not die of it
            return None

    # -- stop -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Graceful: no new connections, requests in flight finish (ProxyService.stopService)."""
        if self.stopping:
            return
        self.stopping = True
        d = defer.maybeDeferred(self.service.stopService)

        def done(_):
            self._close_spool()
            self.send_status()
            self.reactor.callLater(0.05, self.reactor.stop)

        d.addBoth(done)


    def _close_spool(self) -> None:
        """Every record written, the open segment sealed and synced: the node ships it."""
        if self.spool is None:
            return
        if self._sealer is not None and self._sealer.running:
            self._sealer.stopService()
        if self.spool_writer.running:
            self.spool_writer.stopService()
        try:
            self.spool.close()
        except OSError as e:
            log.error("access record spool not closed cleanly: {why}", why=str(e))


def one_accept_per_wakeup(port) -> None:
    """Accept one connection each time the shared socket is readable (nginx's `multi_accept off`).

    Every worker waits on the same socket; Twisted's default accepts up to 100 and more per wakeup,
    so the first worker to wake takes a whole burst (a browser's or a balancer's 50 connections
    opened at once) and the others get none. One at a time, the waiting workers take turns."""
    base = type(port)
    port.__class__ = _ONE_ACCEPT.setdefault(base, type("OneAccept" + base.__name__, (base,), {
        "numberAccepts": property(lambda self: 1, lambda self, value: None)}))


_ONE_ACCEPT: dict[type, type] = {}


def log_line(event: dict) -> str:
    """One event as one JSON line on stderr: the node logs it again at its level, under the
    worker's pid (a line that is not JSON, e.g. an interpreter crash, is logged as an error)."""
    level = event.get("log_level")
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    return json.dumps({"level": level.name if level is not None else "info", "text": text}) + "\n"


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stderr, log_line)], redirectStandardIO=False)
    from twisted.internet import reactor

    from pathlib import Path

    from safesquid_tw.workers.spools import lock_slot, slot_directory

    config = config_from_json(spec["config"])
    slot = int(spec.get("slot", 0))
    # Held until this process exits: one writer per slot's spool, also across node restarts.
    lock_slot(slot_directory(Path(config.state_dir), slot))
    worker = Worker(reactor, config, spec["sockets"], slot, spec.get("counts"))
    worker.heap = HeapFreezer()
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(worker.stop))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the node, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node reloads and tells us
    failed: list[bool] = []

    def start() -> None:
        try:
            worker.start()
        except Exception:
            # A worker that cannot start must not linger half-built: the node restarts it (with
            # back-off) and keeps serving on the others meanwhile.
            log.failure("worker could not start")
            failed.append(True)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return 1 if failed else 0
