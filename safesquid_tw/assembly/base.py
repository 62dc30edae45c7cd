"""What every role is built on: the state directory, the event log, the node's state, the
policy store (and, where a portal edits it, its history), the portal port, and the last steps
that finish a node's service tree. The roles themselves are in safesquid_tw/assembly/roles.py."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.assembly.parts import (
    CachedPolicyService, EventLogService, ListeningFile, NodeStateService, PolicyFileService, PolicyPoolService,
    PortalService,
)
from safesquid_tw.config import NodeConfig
from safesquid_tw.metrics import NodeMetrics
from safesquid_tw.metrics.collectors import NodeCollector, PolicyCollector
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.applier import (
    BACKGROUND_NICENESS,
    POLICY_SWITCH_INTERVAL,
    PolicyApplier,
    policy_thread_pool,
    thread_runner,
)
from safesquid_tw.policy.history import PolicyHistory
from safesquid_tw.policy.shadowing import policy_warnings
from safesquid_tw.policy.store import PolicyCacheCorrupt, PolicyStore, source_kind
from safesquid_tw.portal.filereload import replaced_comment, versions_the_file_replaces
from safesquid_tw.portal.plainhealth import make_health_only_site
from safesquid_tw.util.atomic import atomic_write
from safesquid_tw.util.threads import ThreadRunner, pool_runner, reactor_pool

log = Logger()

PORTAL_IDLE_TIMEOUT = 15.0
LOGGED_SHADOW_WARNINGS = 10  # shadowed-rule warnings logged one by one per version; the rest counted


def prepare_state_dir(path: str) -> Path:
    """Create the state directory tree; it holds keys and logs, so only the owner may enter."""
    root = Path(path)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for sub in ("logs", "run", "policy"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    return root


def state_follows_store(state: NodeState, store: PolicyStore, *, now: Callable[[], float] = time.time) -> None:
    """Keep the node's state (version, digest, since, source: what /health and the cluster view
    say) in step with the store. The one place `policy_source` is written."""

    def on_policy(policy) -> None:
        state.policy_version = policy.version
        state.policy_since = now()
        state.policy_digest = policy.digest
        state.policy_source = source_kind(store.current_source, from_cache=store.current_from_cache)
        if not store.shadow_warnings:
            return
        # Computed where the version was prepared (a worker thread), not here on the reactor.
        warnings = policy_warnings(policy)
        # A few lines, not one per warning: a 1000-rule policy can have hundreds, and writing
        # them to both logs on every version would hold up the reactor for a good fraction of
        # a second. The API's answer and `python -m safesquid_tw.policy.check` list them all.
        for warning in warnings[:LOGGED_SHADOW_WARNINGS]:
            log.warn("policy version {version}: {warning}", version=policy.version, warning=warning.message)
        if len(warnings) > LOGGED_SHADOW_WARNINGS:
            log.warn("policy version {version}: {more} more rules are shadowed (listed by the API's answer and by "
                     "python -m safesquid_tw.policy.check)", version=policy.version,
                     more=len(warnings) - LOGGED_SHADOW_WARNINGS)

    store.add_observer(on_policy)


@attrs.define
class NodeBase:
    """What every role has: state dir, event log, node state, policy store, the portal port."""

    config: NodeConfig
    reactor: object
    top: MultiService
    root: Path
    state: NodeState
    store: PolicyStore
    waits: dict = attrs.field(factory=dict)
    metrics: NodeMetrics = attrs.field(factory=NodeMetrics)
    reloads: object = None  # reload.ReloadService: what SIGHUP reloads on this node
    in_thread: ThreadRunner = reactor_pool  # blocking work (report store) leaves the reactor here
    _history: PolicyHistory | None = None

    @property
    def history(self) -> PolicyHistory:
        """Every version applied here; built on first use (masters and standalone nodes: slaves
        take their versions from the master and keep no history)."""
        if self._history is None:
            self._history = PolicyHistory(self.store, self.root)
            for problem in self._history.problems:
                log.error("policy history: {problem}", problem=problem)
        return self._history

    @classmethod
    def create(cls, config: NodeConfig, reactor) -> "NodeBase":
        root = prepare_state_dir(config.state_dir)
        top = MultiService()
        EventLogService(root / "logs" / "extended.log", config.log_rotate_bytes, config.log_keep).setServiceParent(top)
        state = NodeState(role=config.role, node=config.node_name)
        store = PolicyStore(root)
        store.shadow_warnings = config.role != "slave"  # a slave's master warns about its policy
        pool = policy_thread_pool()
        serves_proxy_here = config.role != "master" and config.workers <= 1
        store.applier = PolicyApplier(thread_runner(reactor, pool), switch_interval=POLICY_SWITCH_INTERVAL,
                                      niceness=0 if serves_proxy_here else BACKGROUND_NICENESS)
        PolicyPoolService(pool).setServiceParent(top)

        state_follows_store(state, store, now=reactor.seconds)
        top.node_state = state
        top.policy_store = store
        from safesquid_tw.reload import ReloadService

        node = cls(config, reactor, top, root, state, store, reloads=ReloadService(reactor), in_thread=pool_runner(reactor))
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
        return policy is not None

    def policy_file_service(self, path: str, *, only_if_empty: bool = False) -> "PolicyFileService":
        def replacing(source):
            """What a file load replaces: versions applied in the portal or the API since."""
            replaced = versions_the_file_replaces(self.history, source)
            comment = f"loaded from {path}"
            if replaced:
                # A file reload (SIGHUP) over versions applied in the portal or the API: say so
                # in the history entry and the log; a rollback brings them back.
                comment += replaced_comment(replaced)
            return replaced, comment

        def warn_replaced(policy, replaced):
            if replaced and policy.version != replaced[0].version:
                log.warn(
                    "policy file {path} replaced version(s) {versions} applied in the portal or API since the "
                    "file was last loaded; roll back to version {newest} to bring them back",
                    path=path, versions=", ".join(str(i.version) for i in reversed(replaced)),
                    newest=replaced[0].version,
                )
            return policy

        def apply(doc, source):
            replaced, comment = replacing(source)
            policy = self.history.apply(doc, by="policy file", comment=comment, source=source)
            return warn_replaced(policy, replaced)

        source = f"file {path}"

        def loaded_before(file_digest: str) -> int | None:
            for info in self.history.versions():  # newest first
                if info.source == source:
                    return info.version if info.digest == file_digest else None
            return None

        def apply_async(doc, source):
            replaced, comment = replacing(source)
            d = self.history.apply_async(doc, by="policy file", comment=comment, source=source)
            return d.addCallback(warn_replaced, replaced)

        return PolicyFileService(
            self.reactor, apply, self.store, path, only_if_empty=only_if_empty, loaded_before=loaded_before,
            apply_async=apply_async,
        )

    def cached_policy_service(self, then=None) -> CachedPolicyService:
        return CachedPolicyService(self.load_cache, then)

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
        from safesquid_tw.util.periodic import Periodic

        days = self.config.report_retention_days

        def prune():
            cutoff = self.reactor.seconds() - days * 86400

            def done(removed: int) -> None:
                if removed:
                    log.info("report retention: removed {n} records older than {days:g} days", n=removed, days=days)

            return self.in_thread(reports.prune, cutoff).addCallback(done)

        Periodic(3600.0, prune, clock=self.reactor, name="report retention", now=True).setServiceParent(self.top)

    def finish(self) -> MultiService:
        reloads = self.reloads
        eventlog = self.top.getServiceNamed("eventlog")
        reloads.steps.insert(0, ("reopen extended.log", lambda: eventlog.observer and eventlog.observer.reopen()))
        reloads.setServiceParent(self.top)  # after PolicyFileService: its SIGHUP handler is chained to
        node_state = NodeStateService(self.state, self.config, self.reactor)
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
