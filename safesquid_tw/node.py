"""Assembling a node: the service tree for each role, from a NodeConfig."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.config import NodeConfig
from safesquid_tw.eventlog import start_event_log, stop_event_log
from safesquid_tw.metrics import NodeMetrics
from safesquid_tw.metrics.collectors import NodeCollector, PolicyCollector
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.codec import digest, parse_json
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.master.history import PolicyHistory
from safesquid_tw.policy.applier import PolicySuperseded, PolicyApplier, policy_thread_pool, thread_runner
from safesquid_tw.policy.store import PolicyCacheCorrupt, PolicyStore
from safesquid_tw.policy.shadowing import shadowed_rules
from safesquid_tw.portal.plainhealth import make_health_only_site
from safesquid_tw.portal.filereload import replaced_comment, versions_the_file_replaces
from safesquid_tw.util.atomic import atomic_write

log = Logger()

PORTAL_IDLE_TIMEOUT = 15.0
POLICY_SWITCH_INTERVAL = 0.0005  # seconds: the GIL's switch interval while a policy is prepared


def prepare_state_dir(path: str) -> Path:
    """Create the state directory tree; it holds keys and logs, so only the owner may enter."""
    root = Path(path)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for sub in ("logs", "run", "policy"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    return root


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

    def __init__(self, base: "NodeBase", then=None) -> None:
        self.base = base
        self.then = then

    def startService(self) -> None:
        super().startService()
        loaded = self.base.load_cache()
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

    def __init__(self, state: NodeState, config: NodeConfig) -> None:
        self.state = state
        self.config = config

    def startService(self) -> None:
        super().startService()
        self.state.started = time.time()

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


def build_node_service(config: NodeConfig, reactor=None) -> MultiService:
    """The whole node for its role; see safesquid_tw/slave/service.py and master/service.py."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if config.role == "master":
        from safesquid_tw.master.service import build_master

        return build_master(config, reactor)
    from safesquid_tw.slave.service import build_proxy_node

    return build_proxy_node(config, reactor)


@attrs.define
class NodeBase:
    """What every role has: state dir, event log, node state, policy store, the portal port."""

    config: NodeConfig
    reactor: object
    top: MultiService
    root: Path
    state: NodeState
    store: PolicyStore
    history: PolicyHistory
    waits: dict = attrs.field(factory=dict)
    metrics: NodeMetrics = attrs.field(factory=NodeMetrics)
    reloads: object = None  # reload.ReloadService: what SIGHUP reloads on this node

    @classmethod
    def create(cls, config: NodeConfig, reactor) -> "NodeBase":
        root = prepare_state_dir(config.state_dir)
        top = MultiService()
        EventLogService(root / "logs" / "extended.log", config.log_rotate_bytes, config.log_keep).setServiceParent(top)
        state = NodeState(role=config.role, node=config.node_name)
        store = PolicyStore(root)
        pool = policy_thread_pool()
        store.applier = PolicyApplier(thread_runner(reactor, pool), switch_interval=POLICY_SWITCH_INTERVAL)
        PolicyPoolService(pool).setServiceParent(top)

        def on_policy(policy) -> None:
            state.policy_version = policy.version
            state.policy_since = time.time()
            state.policy_digest = policy.digest
            for warning in shadowed_rules(policy.document):
                log.warn("policy version {version}: {warning}", version=policy.version, warning=warning.message)

        store.add_observer(on_policy)
        history = PolicyHistory(store, root)
        for problem in history.problems:
            log.error("policy history: {problem}", problem=problem)
        top.node_state = state
        top.policy_store = store
        from safesquid_tw.reload import ReloadService

        node = cls(config, reactor, top, root, state, store, history, reloads=ReloadService(reactor))
        # Other parts register their collectors on `top.metrics` (safesquid_tw/metrics).
        top.metrics = node.metrics
        node.metrics.register(NodeCollector(state, __version__))
        node.metrics.register(PolicyCollector(state, store))
        return node

    def load_cache(self) -> bool:
        try:
            policy = self.store.load_cache()
        except PolicyCacheCorrupt as e:
            log.error("the policy cache was corrupt and was set aside: {error}", error=str(e))
            return False
        except OSError as e:
            log.error("the policy cache cannot be read: {error}", error=str(e))
            return False
        if policy is not None:
            self.state.policy_source = "cache"
        return policy is not None

    def policy_file_service(self, path: str, *, only_if_empty: bool = False) -> "PolicyFileService":
        def comment_for(replaced) -> str:
            comment = f"loaded from {path}"
            if replaced:
                # A file reload (SIGHUP) over versions applied in the portal or the API: say so
                # in the history entry and the log; a rollback brings them back.
                comment += replaced_comment(replaced)
            return comment

        def in_force(policy, replaced):
            if replaced and policy.version != replaced[0].version:
                log.warn(
                    "policy file {path} replaced version(s) {versions} applied in the portal or API since the "
                    "file was last loaded; roll back to version {newest} to bring them back",
                    path=path, versions=", ".join(str(i.version) for i in reversed(replaced)),
                    newest=replaced[0].version,
                )
            self.state.policy_source = "file"
            return policy

        def apply(doc, source):
            replaced = versions_the_file_replaces(self.history, source)
            policy = self.history.apply(doc, by="policy file", comment=comment_for(replaced), source=source)
            return in_force(policy, replaced)

        source = f"file {path}"

        def loaded_before(file_digest: str) -> int | None:
            for info in self.history.versions():  # newest first
                if info.source == source:
                    return info.version if info.digest == file_digest else None
            return None

        def apply_async(doc, source):
            replaced = versions_the_file_replaces(self.history, source)
            d = self.history.apply_async(doc, by="policy file", comment=comment_for(replaced), source=source)
            return d.addCallback(in_force, replaced)

        return PolicyFileService(
            self.reactor, apply, self.store, path, only_if_empty=only_if_empty, loaded_before=loaded_before,
            apply_async=apply_async,
        )

    def cached_policy_service(self, then=None) -> CachedPolicyService:
        return CachedPolicyService(self, then)

    def portal(self, *, control_factory=None, registry=None, reports=None) -> PortalService:
        from safesquid_tw.cluster.mux import PortalPortFactory
        from safesquid_tw.cluster.tlsconfig import load_or_create_master_identity
        from safesquid_tw.portal.app import PortalContext, build_portal_site
        from safesquid_tw.portal.startup import StartupParams

        config = self.config
        slave = config.role == "slave"
        context = PortalContext(
            role=config.role,
            state=self.state,
            state_dir=self.root,
            reactor=self.reactor,
            store=self.store,
            history=None if slave else self.history,
            registry=registry,
            reports=reports,
            master_address=config.master,
            # Slaves edit their startup parameters; a standalone node can join a cluster.
            startup_params=StartupParams(self.root, reactor=self.reactor)
            if config.role in ("slave", "standalone") else None,
            ca_store=getattr(self.top, "ca_store", None),
        )
        site = build_portal_site(context)
        # A connection that sends nothing useful is dropped after this many idle seconds.
        site.timeOut = PORTAL_IDLE_TIMEOUT
        if not slave:
            _bootstrap_api_token(site.portal_services.tokens, self.root)
        identity = load_or_create_master_identity(
            self.root, label="master" if config.role == "master" else "portal"
        )
        health_site = make_health_only_site(self.state, reactor=self.reactor, ca_store=getattr(self.top, "ca_store", None))
        health_site.timeOut = PORTAL_IDLE_TIMEOUT
        self._mount_metrics(site, health_site)
        factory = PortalPortFactory(
            identity.server_options(),
            control_factory or _NoControlPlane(),
            site,
            clock=self.reactor,
            plain_http=True,
            plain_limited_factory=health_site,
        )
        service = PortalService(self.reactor, config.portal, factory, stop_grace=config.stop_grace)
        self.waits["portal"] = service.listening
        return service

    def _mount_metrics(self, site, health_site) -> None:
        """`/metrics` on the portal (HTTPS) and in plain HTTP beside /health: see metrics/resource.py."""
        from safesquid_tw.metrics.collectors import PortalCollector
        from safesquid_tw.metrics.resource import MetricsResource, read_token_file

        services = site.portal_services
        token = read_token_file(self.config.metrics_token_file) if self.config.metrics_token_file else None
        resource = MetricsResource(self.metrics, services.allow, self.state, token)
        site.resource.putChild(b"metrics", resource)
        health_site.resource.putChild(b"metrics", resource)
        self.metrics.register(PortalCollector(services))
    def report_store(self):
        """The report store `--report-store` names (the embedded SQLite file by default)."""
        from safesquid_tw.reporting.backend import masked, open_report_store

        config = self.config
        if config.report_store != "sqlite":
            log.info("report store: {url}", url=masked(config.report_store))
        return open_report_store(
            config.report_store, self.root, read_url=config.report_read_url,
            password_file=config.report_store_password_file,
        )

    def report_retention(self, reports) -> None:
        """Old records leave the report store in the background: hourly, in small batches (so
        ingest never waits long), in a worker thread."""
        from twisted.internet import threads

        from safesquid_tw.util.periodic import Periodic

        days = self.config.report_retention_days

        def prune():
            cutoff = time.time() - days * 86400

            def done(removed: int) -> None:
                if removed:
                    log.info("report retention: removed {n} records older than {days:g} days", n=removed, days=days)

            return threads.deferToThread(reports.prune, cutoff).addCallback(done)

        Periodic(3600.0, prune, clock=self.reactor, name="report retention", now=True).setServiceParent(self.top)

    def finish(self) -> MultiService:
        from safesquid_tw.reload import ReloadService

        reloads = self.reloads
        eventlog = self.top.getServiceNamed("eventlog")
        reloads.steps.insert(0, ("reopen extended.log", lambda: eventlog.observer and eventlog.observer.reopen()))
        reloads.setServiceParent(self.top)  # after PolicyFileService: its SIGHUP handler is chained to
        node_state = NodeStateService(self.state, self.config)
        ListeningFile(self.root / "run" / "listening.json", self.waits, on_ready=node_state.announce).setServiceParent(
            self.top
        )
        # Last child: stopped first, so /health says 503 before anything else winds down.
        node_state.setServiceParent(self.top)
        return self.top


def _bootstrap_api_token(tokens, root: Path) -> None:
    """On first start, one API token for automation, its secret written once to
    `<state-dir>/api-token` (mode 0600), like the admin password; revoke it in the portal."""
    path = root / "api-token"
    if path.exists() or any(t.name == "bootstrap" for t in tokens.tokens()):
        return
    _info, secret = tokens.create("bootstrap", by="first start")
    atomic_write(str(path), (secret + "\n").encode("ascii"), mode=0o600)
    log.info("an API token for /api/v1/ was written to {path} (mode 0600)", path=str(path))


class _NoControlPlane(Factory):
    """Only a master speaks the control plane; anyone else asking for it is turned away."""

    noisy = False

    def buildProtocol(self, addr):
        return None
