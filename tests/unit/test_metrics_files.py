"""etc/prometheus.yml is a valid scrape configuration, and every query of
etc/grafana-dashboard.json parses as PromQL and names metrics the nodes export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ETC = Path(__file__).resolve().parents[2] / "etc"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
EXPORTED = {
    "safesquid_requests_total", "safesquid_request_duration_seconds_bucket", "safesquid_spool_backlog_records",
    "safesquid_spool_memory_backlog_records", "safesquid_spool_backlog_bytes", "safesquid_spool_dropped_records_total",
    "safesquid_cluster_node_policy_lag_versions", "safesquid_cluster_node_connected",
    "safesquid_policy_push_latency_seconds", "safesquid_policy_last_apply_seconds", "safesquid_upstream_failures_total",
    "safesquid_client_connections", "safesquid_tunnels", "safesquid_client_bytes_total",
    "safesquid_ingested_records_total", "safesquid_portal_failed_logins_total", "safesquid_node_info",
}


@needs_promtool
def test_the_scrape_configuration_is_valid():
    result = subprocess.run([PROMTOOL, "check", "config", str(ETC / "prometheus.yml")], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _queries() -> list[str]:
    dashboard = json.loads((ETC / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_dashboard_uses_exported_metrics_only():
    for expr in _queries():
        for name in re.findall(r"\bsafesquid_[a-z_]+", expr):
            assert name in EXPORTED, f"{name} in {expr!r} is not a metric the nodes export"


@needs_promtool
def test_every_dashboard_query_is_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, expr in enumerate(_queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
