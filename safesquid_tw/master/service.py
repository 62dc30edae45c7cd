"""The master: holds the policy and its history, admits slaves, pushes policy, keeps the reports.

It carries no client traffic: there is no proxy listener at all. Its one port (`--portal`) serves
the portal over HTTPS and the control plane (Perspective Broker inside the same TLS, picked by
ALPN).
"""

from __future__ import annotations


from twisted.application.service import MultiService
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.cluster.jellysafety import ClusterServerFactory
from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
from safesquid_tw.cluster.master_side import ControlPlane, ControlRoot
from safesquid_tw.config import NodeConfig, read_activation_key
from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.node import NodeBase
from safesquid_tw.resources import sample_policy_path

log = Logger()


def build_master(config: NodeConfig, reactor) -> MultiService:
    base = NodeBase.create(config, reactor)
    root, store, top = base.root, base.store, base.top

    base.cached_policy_service().setServiceParent(top)
    if config.policy_file:
        base.policy_file_service(config.policy_file).setServiceParent(top)
    else:
        base.policy_file_service(str(sample_policy_path()), only_if_empty=True).setServiceParent(top)

    registry = SlaveRegistry()
    reports = base.report_store()
    plane = ControlPlane(
        reactor=reactor,
        key=ClusterKey.from_activation_key(read_activation_key(config.activation_key_file)),
        version=NodeVersion(__version__),
        store=store,
        registry=registry,
        ingest=reports.ingest,
        record_dropped=reports.record_dropped,
        keepalive=config.keepalive,
    )
    base.portal(
        control_factory=ClusterServerFactory(ControlRoot(plane)), registry=registry, reports=reports
    ).setServiceParent(top)
    base.report_retention(reports)
    top.registry = registry
    top.reports = reports
    top.control_plane = plane
    return base.finish()
