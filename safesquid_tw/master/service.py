"""The master: holds the policy and its history, admits slaves, pushes policy, keeps the reports.

It carries no client traffic: there is no proxy listener at all. Its one port (`--portal`) serves
the portal over HTTPS and the control plane (Perspective Broker inside the same TLS, picked by
ALPN).
"""

from __future__ import annotations


from twisted.application.service import MultiService
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.cluster.guard import ControlGuard, GuardedServerFactory
from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
from safesquid_tw.cluster.master_side import ControlPlane, ControlRoot
from safesquid_tw.config import NodeConfig, read_activation_key
from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.node import NodeBase
from safesquid_tw.reporting.recordcheck import QuarantineFile, quarantining
from safesquid_tw.reporting.store import ReportStore
from safesquid_tw.resources import sample_policy_path

log = Logger()


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

    registry = SlaveRegistry(path=str(root / "nodes.json"))
    if registry.problem:
        log.error("cluster view: {problem}", problem=registry.problem)
    elif registry.records:
        log.info("cluster view: {n} known node(s), shown as not connected until they return",
                 n=len(registry.records))
    reports = ReportStore(root / "reports.sqlite3")
    quarantine = QuarantineFile(root / "quarantine.jsonl")
    guard = ControlGuard(reactor)
    plane = ControlPlane(
        reactor=reactor,
        key=ClusterKey.from_activation_key(read_activation_key(config.activation_key_file)),
        version=NodeVersion(__version__),
        store=store,
        registry=registry,
        ingest=quarantining(reports.ingest, reports, quarantine),
        record_dropped=reports.record_dropped,
        keepalive=config.keepalive,
        guard=guard,
    )
    base.portal(
        control_factory=GuardedServerFactory(ControlRoot(plane), guard), registry=registry, reports=reports
    ).setServiceParent(top)
    base.report_retention(reports)
    top.registry = registry
    top.reports = reports
    top.quarantine = quarantine
    top.control_plane = plane
    top.control_guard = guard
    return base.finish()
