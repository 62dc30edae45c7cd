"""The services every node is assembled from: event log, policy cache and file, the policy
thread, the portal port, listening.json and the node's started/stopping state."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.config import NodeConfig
from safesquid_tw.eventlog import start_event_log, stop_event_log
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.codec import digest, parse_json
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.util.atomic import atomic_write

log = Logger()

class EventLogService(Service):
    """Owns `<state-dir>/logs/extended.log` for the lifetime of the node (the first service to
    start, the last to stop)."""

    name = "eventlog"

    def __init__(self, path: Path, rotate_bytes: int, keep: int) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.observer = None

    def privilegedStartService(self) -> None:
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        self._open()
        super().startService()

    def _open(self) -> None:
        if self.observer is None:
            self.observer = start_event_log(str(self.path), rotate_bytes=self.rotate_bytes, keep=self.keep)

    def stopService(self):
        super().stopService()
        if self.observer is not None:
            stop_event_log(self.observer)
            self.observer = None


class CachedPolicyService(Service):
    """Loads the policy cache when the node starts (before anything listens), so that what it
    found, or set aside, is told in the event log; then hands the outcome on."""

    name = "policy-cache"

    def __init__(self, load: Callable[[], bool], then: Callable[[bool], None] | None = None) -> None:
        self.load = load
        self.then = then

    def startService(self) -> None:
        super().startService()
        loaded = self.load()
        if self.then is not None:
            self.then(loaded)


class PolicyFileService(Service):
    """A policy file loaded at start and again on SIGHUP (standalone nodes, and a master given
    --policy). A file that does not validate is refused with the reason; the running policy stays."""

    name = "policy-file"

    def __init__(
        self, reactor, apply, store: PolicyStore, path: str, *, only_if_empty: bool = False, loaded_before=None,
        apply_async=None,
    ) -> None:
        self.loaded_before = loaded_before  # digest -> the version this file was last loaded as
        self.apply_async = apply_async  # (document or callable, source) -> Deferred[Policy]
        self.reactor = reactor
        self.apply = apply
        self.store = store
        self.path = path
        self.only_if_empty = only_if_empty  # a first policy to start from, when there is none
        self._previous_handler = None

    def startService(self) -> None:
        super().startService()
        if self.only_if_empty:
            if self.store.current is None:
                log.info("no policy yet: starting from {path}", path=self.path)
                self.load()
            return
        self.load(at_start=True)
        try:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        except ValueError:  # not the main thread (tests): reload() is still callable
            self._previous_handler = None

    def stopService(self):
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def load(self, *, at_start: bool = False) -> None:
        before = self.store.current
        try:
            with open(self.path, "rb") as f:
                doc = parse_json(f.read())
            if at_start and self.loaded_before is not None and before is not None:
                # A file that has not changed since it was last loaded does not undo, at a
                # restart, what administrators applied in the portal since; SIGHUP still does.
                version = self.loaded_before(digest(validate_document(doc)))
                if version is not None and version != before.version:
                    log.info(
                        "policy file {path} is unchanged since it was loaded as version {old}: "
                        "version {version} (applied since) stays; send SIGHUP to load the file again",
                        path=self.path, old=version, version=before.version,
                    )
                    return
            policy = self.apply(doc, f"file {self.path}")
        except (OSError, PolicyError) as e:
            current = self.store.current
            log.error(
                "policy from {path} refused: {error}; still running version {version}",
                path=self.path, error=str(e), version=current.version if current else None,
            )
            return
        if before is not None and before.version == policy.version:
            log.info("policy file {path} is unchanged: version {version} stays", path=self.path, version=policy.version)
            return
        log.info(
            "policy version {version} ({digest}) loaded from {path}",
            version=policy.version, digest=policy.digest, path=self.path,
        )

    def reload(self) -> None:
        log.info("SIGHUP: reloading the policy from {path}", path=self.path)
        self.load_in_background()

    def load_in_background(self) -> defer.Deferred:
        """`load` with reading, validating, compiling and writing off the reactor thread (the
        store's applier): a big policy never stalls traffic. Refusals are logged as in `load`."""
        if self.apply_async is None:
            self.load()
            return defer.succeed(None)
        before = self.store.current
        path = self.path

        def read():
            with open(path, "rb") as f:
                return parse_json(f.read())

        def done(policy) -> None:
            if before is not None and before.version == policy.version:
                log.info("policy file {path} is unchanged: version {version} stays", path=path, version=policy.version)
                return
            log.info("policy version {version} ({digest}) loaded from {path}",
                     version=policy.version, digest=policy.digest, path=path)

        def refused(failure) -> None:
            failure.trap(OSError, PolicyError, PolicySuperseded)
            current = self.store.current
            log.error("policy from {path} refused: {error}; still running version {version}",
                      path=path, error=failure.getErrorMessage(), version=current.version if current else None)

        d = self.apply_async(read, f"file {path}")
        d.addCallbacks(done, refused)
        return d


class PolicyPoolService(Service):
    """The thread new policy versions are prepared in (validate, compile, write) while the reactor
    keeps serving; see policy/applier.py."""

    name = "policy-pool"

    def __init__(self, pool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


class ListeningFile(Service):
    """Writes `<state-dir>/run/listening.json` once the sockets are bound (ports may be 0)."""

    name = "listening-file"

    def __init__(self, path: Path, waits: dict[str, defer.Deferred], on_ready=None) -> None:
        self.path = path
        self.waits = waits
        self.on_ready = on_ready  # called once every socket is bound (never after "cannot listen")

    def startService(self) -> None:
        super().startService()
        names = list(self.waits)
        d = defer.gatherResults([self.waits[n] for n in names], consumeErrors=True)
        d.addCallback(self._write, names)
        d.addErrback(self._failed)

    def _write(self, ports, names) -> None:
        info = {}
        for name, port in zip(names, ports):
            host = port.getHost()
            info[name] = f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        atomic_write(str(self.path), json.dumps(info).encode() + b"\n", mode=0o644)
        if self.on_ready is not None:
            self.on_ready()

    def _failed(self, reason) -> None:
        # gatherResults wraps the listener's error: name the one that failed, in one line.
        error = reason.value
        first = getattr(error, "subFailure", None)
        why = first.getErrorMessage() if first is not None else reason.getErrorMessage()
        log.critical("cannot listen, stopping: {why}", why=why)
        from twisted.internet import reactor

        # A node that cannot take its addresses must not look like a clean stop to its supervisor.
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        # Listening fails while the services start, before the reactor runs: stop it once it does.
        reactor.callWhenRunning(reactor.stop)

    def stopService(self):
        super().stopService()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class PortalService(Service):
    """The `--portal` port: TLS with the node's own certificate, ALPN choosing the control plane
    (masters only) or the web portal; plain HTTP is served on loopback addresses only."""

    name = "portal"

    def __init__(self, reactor, endpoint: str, factory, *, stop_grace: float = 0.0) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory = factory
        self.stop_grace = stop_grace
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = endpoints.serverFromString(self.reactor, self.endpoint).listen(self.factory)
        d.addCallbacks(self._listening, self.listening.errback)

    def _listening(self, port) -> None:
        self.port = port
        host = port.getHost()
        log.info("portal and /health listening on {host}:{port}", host=host.host, port=host.port)
        self.listening.callback(port)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            if self.stop_grace > 0:
                # /health keeps answering (503) through the grace, so load balancers see the
                # node leave rather than vanish.
                d: defer.Deferred = defer.Deferred()
                self.reactor.callLater(self.stop_grace, d.callback, None)
                yield d
            yield self.port.stopListening()


class NodeStateService(Service):
    """Marks the node started and, first thing at shutdown, not ready (so /health says 503)."""

    def __init__(self, state: NodeState, config: NodeConfig, clock: IReactorTime) -> None:
        self.state = state
        self.config = config
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        self.state.started = self.clock.seconds()

    def announce(self) -> None:
        """Said once the node's sockets are bound (see ListeningFile), so never after a
        "cannot listen"."""
        log.info(
            "safesquid-tw {version} started: role {role}, node {node}",
            version=__version__, role=self.config.role, node=self.config.node_name,
        )

    def stopService(self):
        super().stopService()
        self.state.shutting_down = True
        log.info("node {node} stopping", node=self.config.node_name)
