"""What every node that carries traffic is made of (standalone and slave): the access log and
its durable spool, the shipper, the forward proxy, TLS interception and the directory watch.

`build_proxy_parts` adds them to a NodeBase and hands back a ProxyParts; the roles
(assembly/standalone.py, assembly/slave.py) then add where the policy comes from and where the
records go.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from safesquid_tw.accesslog.spoolwriter import SpoolWriter
from safesquid_tw.accesslog.spool import Spool
from safesquid_tw.accesslog.writer import AccessLogWriter
from safesquid_tw.assembly.base import NodeBase
from safesquid_tw.cluster.shipper import LogShipper
from safesquid_tw.config import NodeConfig
from safesquid_tw.identity.watch import DirectoryCollector, directory_health, directory_watch
from safesquid_tw.metrics.collectors import ProxyCollector, SpoolCollector
from safesquid_tw.metrics.proxyparts import AntivirusCollector, EdgeCollector, TlsInspectionCollector
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory, ProxyService
from safesquid_tw.workers.metrics import WorkersCollector
from safesquid_tw.workers.pool import MergedAntivirus, MergedEdge, WorkerPool

log = Logger()


@attrs.define
class ProxyParts:
    """The traffic-carrying services of one node, for the role to wire further."""

    spool: Spool
    access_log: AccessLogWriter
    spool_writer: SpoolWriter
    shipper: LogShipper
    factory: ProxyFactory
    proxy: ProxyService | WorkerPool  # WorkerPool on a node with --workers > 1


def build_proxy_parts(base: NodeBase) -> ProxyParts:
    """Access log, spool, shipper, proxy factory and service (not yet started: the role adds the
    proxy service to the tree last, after its policy source)."""
    config, reactor, root, store, top = base.config, base.reactor, base.root, base.store, base.top

    # Segments of at most a quarter of the cap, so that the cap drops old records a segment at a
    # time rather than all at once.
    segment_bytes = max(1, min(4 << 20, config.spool_cap_bytes // 4))
    spool = Spool(root / "spool", node=config.node_name, segment_bytes=segment_bytes, cap_bytes=config.spool_cap_bytes)
    for problem in spool.problems:
        log.error("access record spool: {problem}", problem=str(problem))
    access_log = AccessLogWriter(
        str(root / "logs" / "access.log"), rotate_bytes=config.log_rotate_bytes, keep=config.log_keep, clock=reactor
    )
    # Each record reaches the kernel in the reactor turn its request finished in; see
    # accesslog/spoolwriter.py for the promise.
    spool_writer = SpoolWriter(
        reactor, spool, fsync_interval=config.spool_fsync_interval, memory_bytes=config.spool_memory_bytes,
        in_thread=base.in_thread,
    )
    if config.workers <= 1:
        access_log.add_line_sink(spool_writer.append)  # with workers, each spools its own records
    access_log.setServiceParent(top)
    base.reloads.add("reopen access.log", access_log.reopen)
    shipper = LogShipper(reactor, spool, in_thread=base.in_thread)
    shipper.writer = spool_writer
    shipper.setServiceParent(top)
    # Started after the shipper, so stopped before it: the last records are written before the
    # shipper closes the spool.
    spool_writer.setServiceParent(top)
    top.spool_writer = spool_writer
    base.state.health_parts["spool"] = spool_writer.stats

    limits = config.limits
    resolver = Resolver(reactor, threads_max=limits.dns_threads, timeout=limits.dns_timeout, ttl=limits.dns_cache_ttl)
    factory = ProxyFactory(
        reactor=reactor,
        limits=limits,
        node_name=config.node_name,
        current_policy=lambda: store.current,
        record_sink=access_log.write,
        resolver=resolver,
        negotiate=negotiate_acceptor(config),
    )
    factory.records_due = spool_writer.write_due
    factory.after_records = spool_writer.after_records
    # The anti-virus scanner follows every policy version (its services, self-tests, limits).
    store.add_observer(lambda policy: reactor.callFromThread(factory.antivirus.configure, policy.compiled.antivirus))
    base.state.antivirus = factory.antivirus.health
    proxy: ProxyService | WorkerPool
    if config.workers > 1:
        # Worker processes serve the sockets; this process keeps what is one per node.
        proxy = WorkerPool(reactor, config, config.workers, factory, store, access_log.write, state=base.state)
        base.state.health_parts["workers"] = proxy.health
        base.reloads.add("tell the workers", proxy.hup)
        base.metrics.register(WorkersCollector(proxy))
        proxy.own_spool_stats = spool_writer.stats
        proxy.access_log = access_log
        base.state.health_parts["spool"] = proxy.spool_health
    else:
        proxy = ProxyService(reactor, config.listen_endpoints, factory, resolver, stop_grace=config.stop_grace,
                             proxy_protocol_from=config.proxy_protocol_from, drain_grace=config.drain_grace,
                             state=base.state)
    ship_worker_spools(base, shipper, proxy if isinstance(proxy, WorkerPool) else None)
    from safesquid_tw.proxy.intercept.wiring import install_interception, open_ca_store

    # A standalone node makes its own inspection CA; a slave uses its master's (kept from last time).
    top.ca_store = open_ca_store(root, config.node_name, create=config.role == "standalone")
    install_interception(factory, reactor, top.ca_store, store,
                         upstream_ca_file=config.upstream_ca_file).setServiceParent(top)
    if isinstance(proxy, WorkerPool):
        top.ca_store.add_observer(proxy.ca_changed)  # the workers read the new CA too
        base.state.ready_gates.append(proxy.any_accepting)
        base.state.edge = proxy.edge_counters
        base.state.antivirus = proxy.antivirus_health
    base.waits["proxy"] = proxy.listening
    directory_watch(reactor, factory.auth_pool, factory.current_policy).setServiceParent(top)
    base.state.health_parts["directory"] = lambda: directory_health(factory.current_policy)
    if isinstance(proxy, WorkerPool):  # the workers look users up; the node adds its own checks
        base.state.health_parts["directory"] = lambda: proxy.directory_health(directory_health(factory.current_policy))
    if not isinstance(proxy, WorkerPool):
        base.state.edge = factory.edge_counters  # with workers: summed from theirs (set above)
    for number, more in enumerate(proxy.listening_each[1:], start=2):
        base.waits[f"proxy_{number}"] = more  # listening.json names every listener
    return ProxyParts(spool, access_log, spool_writer, shipper, factory, proxy)


def finish_proxy_node(base: NodeBase, parts: ProxyParts):
    """The proxy service, the portal and the metrics, after the role's own parts."""
    top = base.top
    parts.proxy.setServiceParent(top)
    base.portal(reports=getattr(top, "reports", None)).setServiceParent(top)
    top.proxy_factory = parts.factory
    top.proxy_service = parts.proxy
    base.metrics.register(ProxyCollector(parts.factory))
    base.metrics.register(SpoolCollector(parts.spool))
    pool = parts.proxy if isinstance(parts.proxy, WorkerPool) else None
    own_directory = parts.factory.current_policy
    base.metrics.register(DirectoryCollector(
        own_directory, stats=(lambda: pool.directory_health(directory_health(own_directory))) if pool else None))
    base.metrics.register(EdgeCollector(MergedEdge(pool) if pool else parts.factory))
    base.metrics.register(TlsInspectionCollector(parts.factory))
    base.metrics.register(AntivirusCollector(MergedAntivirus(pool, parts.factory.antivirus) if pool
                                             else parts.factory.antivirus))
    return base.finish()


def ship_worker_spools(base: NodeBase, shipper: LogShipper, pool: WorkerPool | None) -> None:
    """Every worker slot's spool joins the node's one shipping stream (workers/spools.py); so do
    slots left from a run with more workers, recovered here."""
    from safesquid_tw.workers.spools import SlotSource, existing_slots, recover_orphan_slot, slot_directory

    config, root = base.config, base.root
    served = range(config.workers) if pool is not None else range(0)
    for slot in sorted(set(served) | set(existing_slots(root))):
        directory = slot_directory(root, slot)
        if slot in served:
            source = SlotSource(directory, slot, config.node_name,
                                ask_delete=lambda local, slot=slot: pool.ask_delete(slot, local))
            pool.sources[slot] = source
        else:
            try:
                recover_orphan_slot(directory, config.node_name)
            except OSError as e:
                log.error("access records of worker slot {slot} cannot be recovered: {why}", slot=slot, why=str(e))
                continue
            source = SlotSource(directory, slot, config.node_name)
        shipper.sources.append(source)


def negotiate_acceptor(config: NodeConfig):
    """The Kerberos acceptor of a node started with --keytab and --service-principal."""
    if not config.keytab:
        return None
    from safesquid_tw.identity.negotiate import NegotiateAcceptor

    acceptor = NegotiateAcceptor(config.keytab, config.service_principal)
    log.info("Kerberos proxy authentication: accepting tickets for {principal} (keytab {keytab})",
             principal=config.service_principal, keytab=config.keytab)
    return acceptor
