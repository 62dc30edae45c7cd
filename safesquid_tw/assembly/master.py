"""The master: holds the policy and its history, admits slaves, pushes policy, keeps the reports.

It carries no client traffic: there is no proxy listener at all. Its one port (`--portal`) serves
the portal over HTTPS and the control plane (Perspective Broker inside the same TLS, picked by
ALPN).
"""

from __future__ import annotations


from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.spread import pb

from safesquid_tw import __version__
from safesquid_tw.cluster.guard import ControlGuard, GuardedServerFactory
from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
from safesquid_tw.cluster.master_side import ControlPlane, ControlRoot
from safesquid_tw.config import NodeConfig, read_activation_key
from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.metrics.collectors import ClusterCollector
from safesquid_tw.assembly.base import NodeBase
from safesquid_tw.reporting.recordcheck import QuarantineFile, quarantining
from safesquid_tw.resources import sample_policy_path

log = Logger()


class ReportStoreUnavailable(pb.Error):
    """Sent to a slave whose batch could not be stored now (pb.Error: without a traceback); the
    slave keeps the batch in its spool and ships it again."""


def _answering_unavailable(ingest):
    from safesquid_tw.reporting.backend import StoreUnavailable

    def guarded(node, segment, first_seq, records):
        try:
            return ingest(node, segment, first_seq, records)
        except StoreUnavailable as e:
            raise ReportStoreUnavailable(str(e)) from None

    return guarded


def build_master(config: NodeConfig, reactor) -> MultiService:
    from safesquid_tw.cluster.keyfile import ensure_master_key

    base = NodeBase.create(config, reactor)
    root, store, top = base.root, base.store, base.top
    ensure_master_key(config.activation_key_file)  # after the event log opened: it says where

    base.cached_policy_service().setServiceParent(top)
    if config.policy_file:
        base.policy_file_service(config.policy_file).setServiceParent(top)
    else:
        base.policy_file_service(str(sample_policy_path()), only_if_empty=True).setServiceParent(top)

    from safesquid_tw.proxy.intercept.wiring import open_ca_store

    top.ca_store = open_ca_store(root, config.node_name, create=True)
    registry = SlaveRegistry(path=str(root / "nodes.json"))
    if registry.problem:
        log.error("cluster view: {problem}", problem=registry.problem)
    elif registry.records:
        log.info("cluster view: {n} known node(s), shown as not connected until they return",
                 n=len(registry.records))
    reports = base.report_store()
    quarantine = QuarantineFile(root / "quarantine.jsonl")
    guard = ControlGuard(reactor)
    plane = ControlPlane(
        reactor=reactor,
        key=ClusterKey.from_activation_key(read_activation_key(config.activation_key_file)),
        version=NodeVersion(__version__),
        store=store,
        registry=registry,
        ingest=_answering_unavailable(quarantining(reports.ingest, reports, quarantine)),
        record_dropped=reports.record_dropped,
        keepalive=config.keepalive,
        guard=guard,
        in_thread=base.in_thread,
    )
    from safesquid_tw.cluster.ca_sync import attach_master

    attach_master(plane, top.ca_store)
    base.portal(
        control_factory=GuardedServerFactory(ControlRoot(plane), guard), registry=registry, reports=reports
    ).setServiceParent(top)
    base.report_retention(reports)
    top.registry = registry
    top.reports = reports
    top.quarantine = quarantine
    top.control_plane = plane
    top.control_guard = guard
    base.metrics.register(ClusterCollector(plane, registry, base.store))
    return base.finish()
