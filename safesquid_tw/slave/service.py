"""A node that carries traffic: a standalone node, or a slave of a master.

Both run the forward proxy, write the access log and a spool of access records. A standalone node
takes its policy from a file and feeds its own report store; a slave takes its policy from its
master (starting from its cache) and ships its records there.
"""

from __future__ import annotations

import time

from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.accesslog.durable import SpoolWriter
from safesquid_tw.accesslog.spool import Spool
from safesquid_tw.accesslog.writer import AccessLogWriter
from safesquid_tw.cluster.shipper import LogShipper
from safesquid_tw.config import NodeConfig, read_activation_key
from safesquid_tw.identity.watch import DirectoryCollector, directory_health, directory_summary, directory_watch
from safesquid_tw.metrics.collectors import MasterLinkCollector, ProxyCollector, SpoolCollector
from safesquid_tw.metrics.parts import AntivirusCollector, EdgeCollector, TlsInspectionCollector
from safesquid_tw.node import NodeBase
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory, ProxyService
from safesquid_tw.reporting.recordcheck import QuarantineFile, quarantining
from safesquid_tw.resources import sample_policy_path

log = Logger()


class RateMeter:
    """Requests per second between two status reports."""

    def __init__(self, reactor, factory: ProxyFactory) -> None:
        self.reactor = reactor
        self.factory = factory
        self._last = (reactor.seconds(), 0)

    def sample(self) -> dict:
        now, total = self.reactor.seconds(), self.factory.requests
        then, before = self._last
        self._last = (now, total)
        rate = (total - before) / (now - then) if now > then else 0.0
        return {"requests_total": total, "requests_per_second": round(rate, 2),
                "directory": directory_summary(self.factory.current_policy)}


def listen_interface(endpoint: str) -> str | None:
    """The address a `tcp:PORT:interface=ADDR` endpoint names, unless it is a wildcard.

    A slave's control-plane connection leaves from the address its proxy listens on, so the
    master's allow list and cluster view see the node's own address."""
    for part in endpoint.replace("\\:", "\0").split(":")[1:]:
        if part.startswith("interface="):
            address = part[len("interface="):].replace("\0", ":")
            return None if address in ("", "0.0.0.0", "::") else address
    return None


def build_proxy_node(config: NodeConfig, reactor) -> MultiService:
    base = NodeBase.create(config, reactor)
    root, store = base.root, base.store
    top = base.top

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
    # accesslog/durable.py for the promise.
    spool_writer = SpoolWriter(
        reactor, spool, fsync_interval=config.spool_fsync_interval, memory_bytes=config.spool_memory_bytes
    )
    access_log.add_line_sink(spool_writer.append)
    access_log.setServiceParent(top)
    base.reloads.add("reopen access.log", access_log.reopen)
    shipper = LogShipper(reactor, spool)
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
        negotiate=_negotiate_acceptor(config),
    )
    # The anti-virus scanner follows every policy version (its services, self-tests, limits).
    store.add_observer(lambda policy: reactor.callFromThread(factory.antivirus.configure, policy.compiled.antivirus))
    base.state.antivirus = factory.antivirus.health
    proxy = ProxyService(reactor, config.listen_endpoints, factory, resolver, stop_grace=config.stop_grace,
                         proxy_protocol_from=config.proxy_protocol_from)
    from safesquid_tw.proxy.intercept.wiring import install_interception, open_ca_store

    # A standalone node makes its own inspection CA; a slave uses its master's (kept from last time).
    top.ca_store = open_ca_store(root, config.node_name, create=config.role == "standalone")
    install_interception(factory, reactor, top.ca_store, store,
                         upstream_ca_file=config.upstream_ca_file).setServiceParent(top)
    base.waits["proxy"] = proxy.listening
    directory_watch(reactor, factory.auth_pool, factory.current_policy).setServiceParent(top)
    base.state.health_parts["directory"] = lambda: directory_health(factory.current_policy)
    base.state.edge = factory.edge_counters
    for number, more in enumerate(proxy.listening_each[1:], start=2):
        base.waits[f"proxy_{number}"] = more  # listening.json names every listener

    if config.role == "standalone":
        base.cached_policy_service().setServiceParent(top)
        base.policy_file_service(config.policy_file or str(sample_policy_path())).setServiceParent(top)
        reports = base.report_store()
        quarantine = QuarantineFile(root / "quarantine.jsonl")
        ingest = quarantining(reports.ingest, reports, quarantine)
        top.quarantine = quarantine

        def ingest_locally(batch):
            return threads.deferToThread(ingest, batch.node, batch.segment, batch.first_seq, batch.records)

        shipper.set_sender(ingest_locally)
        base.report_retention(reports)
        top.reports = reports
    else:
        _slave_parts(base, factory, shipper)

    proxy.setServiceParent(top)
    base.portal(reports=getattr(top, "reports", None)).setServiceParent(top)
    top.proxy_factory = factory
    base.metrics.register(ProxyCollector(factory))
    base.metrics.register(SpoolCollector(spool))
    base.metrics.register(DirectoryCollector(factory.current_policy))
    base.metrics.register(EdgeCollector(factory))
    base.metrics.register(TlsInspectionCollector(factory))
    base.metrics.register(AntivirusCollector(factory.antivirus))
    return base.finish()


def _slave_parts(base: NodeBase, factory: ProxyFactory, shipper: LogShipper) -> None:
    from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
    from safesquid_tw.cluster.slave_side import ClusterClient
    from safesquid_tw.cluster.tlsconfig import MasterTrust

    config, reactor, state = base.config, base.reactor, base.state
    def cache_loaded(loaded: bool) -> None:
        if loaded:
            log.info(
                "serving cached policy version {version} until the master at {master} answers",
                version=state.policy_version, master=config.master,
            )
        else:
            log.warn(
                "no cached policy: this node refuses to proxy (and /health says 503) until the master at "
                "{master} sends one",
                master=config.master,
            )

    base.cached_policy_service(cache_loaded).setServiceParent(base.top)
    meter = RateMeter(reactor, factory)
    drain_call = []

    def on_task(task: str) -> str:
        if task == "drain":
            state.draining = True
            factory.closing = True  # keep-alive clients reconnect (elsewhere) after each response
            for call in drain_call:
                if call.active():
                    call.cancel()
            drain_call[:] = [reactor.callLater(config.drain_grace, _stop_accepting)]
            log.info("draining: /health says 503; new connections refused in {grace} s", grace=config.drain_grace)
            return f"draining; new connections refused in {config.drain_grace:g} s"
        if task == "resume":
            state.draining = False
            factory.draining = False
            factory.closing = False
            for call in drain_call:
                if call.active():
                    call.cancel()
            log.info("resumed: taking traffic again")
            return "resumed"
        return "reloading the policy from the master"

    def _stop_accepting() -> None:
        if state.draining:
            factory.draining = True
            for conn in list(factory.connections):
                conn.drain(1.0)
            log.info("drained: new connections are refused, requests in flight finish")

    client = ClusterClient(
        reactor=reactor,
        master=config.master,
        key=ClusterKey.from_activation_key(read_activation_key(config.activation_key_file)),
        version=NodeVersion(__version__),
        node_name=config.node_name,
        trust=MasterTrust.for_state_dir(base.root, pinned=config.master_fingerprint),
        store=base.store,
        state=state,
        shipper=shipper,
        status_extra=meter.sample,
        on_task=on_task,
        keepalive=config.keepalive,
        poll_interval=config.poll_interval,
        source_address=listen_interface(config.listen),
    )
    client.setServiceParent(base.top)
    base.top.cluster_client = client
    state.health_parts["master"] = client.master_health
    base.metrics.register(MasterLinkCollector(client, now=time.time))
    from safesquid_tw.cluster.ca_sync import SlaveCASync

    SlaveCASync(client, base.top.ca_store)
    base.reloads.add("ask the master for its policy version", client.recheck)


def _negotiate_acceptor(config):
    """The Kerberos acceptor of a node started with --keytab and --service-principal."""
    if not config.keytab:
        return None
    from safesquid_tw.identity.negotiate import NegotiateAcceptor

    acceptor = NegotiateAcceptor(config.keytab, config.service_principal)
    log.info("Kerberos proxy authentication: accepting tickets for {principal} (keytab {keytab})",
             principal=config.service_principal, keytab=config.keytab)
    return acceptor
