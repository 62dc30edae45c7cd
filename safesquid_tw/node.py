"""Assembling a node: the service tree for each role, from a NodeConfig."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.accesslog.writer import AccessLogWriter
from safesquid_tw.config import NodeConfig
from safesquid_tw.eventlog import start_event_log, stop_event_log
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.codec import parse_json
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyCacheCorrupt, PolicyStore
from safesquid_tw.portal.site import make_portal_site
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory, ProxyService
from safesquid_tw.resources import sample_policy_path
from safesquid_tw.util.atomic import atomic_write

log = Logger()


def prepare_state_dir(path: str) -> Path:
    """Create the state directory tree; it holds keys and logs, so only the owner may enter."""
    root = Path(path)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for sub in ("logs", "run", "policy"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    return root


class EventLogService(Service):
    """Owns `<state-dir>/logs/extended.log` for the lifetime of the node."""

    name = "eventlog"

    def __init__(self, path: Path, rotate_bytes: int, keep: int) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.observer = None

    def privilegedStartService(self) -> None:
        # Started before every other service so that their first lines land in the file.
        self.observer = start_event_log(str(self.path), rotate_bytes=self.rotate_bytes, keep=self.keep)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.observer is None:
            self.observer = start_event_log(str(self.path), rotate_bytes=self.rotate_bytes, keep=self.keep)
        super().startService()

    def stopService(self):
        super().stopService()
        if self.observer is not None:
            stop_event_log(self.observer)
            self.observer = None


class PolicyFileService(Service):
    """A standalone node's policy comes from a file, loaded at start and again on SIGHUP."""

    name = "policy-file"

    def __init__(self, reactor, store: PolicyStore, path: str, state: NodeState) -> None:
        self.reactor = reactor
        self.store = store
        self.path = path
        self.state = state
        self._previous_handler = None

    def startService(self) -> None:
        super().startService()
        try:
            # The cache carries the version number on, so versions keep rising across restarts.
            self.store.load_cache()
        except PolicyCacheCorrupt as e:
            log.error("the policy cache was corrupt and was set aside: {error}", error=str(e))
        except OSError as e:
            log.error("the policy cache cannot be read: {error}", error=str(e))
        self.load()
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

    def load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                doc = parse_json(f.read())
            policy = self.store.apply_document(doc, source=f"file {self.path}")
        except (OSError, PolicyError) as e:
            current = self.store.current
            log.error(
                "policy from {path} refused: {error}; still running version {version}",
                path=self.path, error=str(e), version=current.version if current else None,
            )
            return
        log.info(
            "policy version {version} ({digest}) loaded from {path}",
            version=policy.version, digest=policy.digest, path=self.path,
        )

    def reload(self) -> None:
        log.info("SIGHUP: reloading the policy from {path}", path=self.path)
        self.load()


class ListeningFile(Service):
    """Writes `<state-dir>/run/listening.json` once the sockets are bound (ports may be 0)."""

    name = "listening-file"

    def __init__(self, path: Path, waits: dict[str, defer.Deferred]) -> None:
        self.path = path
        self.waits = waits

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

    def _failed(self, reason) -> None:
        log.failure("cannot listen", reason)
        from twisted.internet import reactor

        reactor.stop()

    def stopService(self):
        super().stopService()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class PortalService(Service):
    name = "portal"

    def __init__(self, reactor, endpoint: str, site) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.site = site
        self.port = None
        self.listening: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = endpoints.serverFromString(self.reactor, self.endpoint).listen(self.site)
        d.addCallbacks(self._listening, self.listening.errback)

    def _listening(self, port) -> None:
        self.port = port
        host = port.getHost()
        log.info("portal and /health listening on {host}:{port}", host=host.host, port=host.port)
        self.listening.callback(port)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()


class NodeStateService(Service):
    """Marks the node started and, first thing at shutdown, not ready (so /health says 503)."""

    def __init__(self, state: NodeState, config: NodeConfig) -> None:
        self.state = state
        self.config = config

    def startService(self) -> None:
        super().startService()
        self.state.started = time.time()
        log.info(
            "safesquid-tw {version} started: role {role}, node {node}",
            version=__version__, role=self.config.role, node=self.config.node_name,
        )

    def stopService(self):
        super().stopService()
        self.state.shutting_down = True
        log.info("node {node} stopping", node=self.config.node_name)


def build_node_service(config: NodeConfig, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    root = prepare_state_dir(config.state_dir)
    top = MultiService()
    state = NodeState(role=config.role, node=config.node_name)

    EventLogService(root / "logs" / "extended.log", config.log_rotate_bytes, config.log_keep).setServiceParent(top)

    store = PolicyStore(root)

    def on_policy(policy) -> None:
        state.policy_version = policy.version
        state.policy_digest = policy.digest

    store.add_observer(on_policy)

    waits: dict[str, defer.Deferred] = {}
    if config.serves_proxy:
        access_log = AccessLogWriter(
            str(root / "logs" / "access.log"),
            rotate_bytes=config.log_rotate_bytes,
            keep=config.log_keep,
            clock=reactor,
        )
        access_log.setServiceParent(top)
        limits = config.limits
        resolver = Resolver(
            reactor,
            threads_max=limits.dns_threads,
            timeout=limits.dns_timeout,
            ttl=limits.dns_cache_ttl,
        )
        factory = ProxyFactory(
            reactor=reactor,
            limits=limits,
            node_name=config.node_name,
            current_policy=lambda: store.current,
            record_sink=access_log.write,
            resolver=resolver,
        )
        proxy = ProxyService(reactor, config.listen, factory, resolver)
        waits["proxy"] = proxy.listening
    if config.role == "standalone":
        state.policy_source = "file"
        policy_path = config.policy_file or str(sample_policy_path())
        PolicyFileService(reactor, store, policy_path, state).setServiceParent(top)

    site = make_portal_site(state)
    portal = PortalService(reactor, config.portal, site)
    waits["portal"] = portal.listening

    if config.serves_proxy:
        proxy.setServiceParent(top)
    portal.setServiceParent(top)
    ListeningFile(root / "run" / "listening.json", waits).setServiceParent(top)
    # Last child: stopped first, so /health says 503 before anything else winds down.
    NodeStateService(state, config).setServiceParent(top)
    top.node_state = state
    top.policy_store = store
    return top

