"""A standalone node: the forward proxy with its policy from a file (SIGHUP reloads it) and its
own report store, fed from its spool in a thread."""

from __future__ import annotations

from twisted.application.service import MultiService

from safesquid_tw.assembly.base import NodeBase
from safesquid_tw.assembly.proxynode import build_proxy_parts, finish_proxy_node
from safesquid_tw.config import NodeConfig
from safesquid_tw.reporting.recordcheck import QuarantineFile, quarantining
from safesquid_tw.resources import sample_policy_path

# A batch the standalone node's own report store takes at once (records, payload bytes).
LOCAL_BATCH_LIMITS = {"max_records": 5000, "max_bytes": 4 << 20}


def build_standalone(config: NodeConfig, reactor) -> MultiService:
    base = NodeBase.create(config, reactor)
    parts = build_proxy_parts(base)
    top = base.top
    base.cached_policy_service().setServiceParent(top)
    base.policy_file_service(config.policy_file or str(sample_policy_path())).setServiceParent(top)
    reports = base.report_store()
    quarantine = QuarantineFile(base.root / "quarantine.jsonl")
    ingest = quarantining(reports.ingest, reports, quarantine)
    top.quarantine = quarantine

    def ingest_locally(batch):
        return base.in_thread(ingest, batch.node, batch.segment, batch.first_seq, batch.records)

    # Records stored in this process need not fit a control-plane message: a sealed segment (half
    # a second of traffic, see cluster/shipper.py) goes in one or a few commits, not one per 500.
    parts.shipper.batch_limits = LOCAL_BATCH_LIMITS
    parts.shipper.set_sender(ingest_locally)
    base.report_retention(reports)
    top.reports = reports
    return finish_proxy_node(base, parts)
