"""The node as a cluster's slave for the per-core bench: a master (unpinned, the far side) and
one slave per measured code tree, each slave with one process (``--workers 1``).

A standalone node stores its own access records in its local report store (SQLite, in threads
of the same process); a slave, the proxy of a real cluster, ships them to its master instead.
The master and its report store are not measured: only the slave's process tree is.

Uses the integration tests' cluster harness (tests/integration/cluster_harness.py), which
imports a module named ``harness`` of its own: it is loaded here with that name for the time of
the import, and the bench's own ``harness`` put back after.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INTEGRATION = REPO / "tests" / "integration"


def _cluster_harness():
    if "bench_cluster_harness" in sys.modules:
        return sys.modules["bench_cluster_harness"]
    saved = sys.modules.get("harness")
    if str(INTEGRATION) not in sys.path:
        sys.path.append(str(INTEGRATION))  # its helpers (rawhttp...); the bench's modules come first
    try:
        spec = importlib.util.spec_from_file_location("harness", INTEGRATION / "harness.py")
        integration_harness = importlib.util.module_from_spec(spec)
        sys.modules["harness"] = integration_harness
        spec.loader.exec_module(integration_harness)
        spec = importlib.util.spec_from_file_location("bench_cluster_harness", INTEGRATION / "cluster_harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_cluster_harness"] = module
        spec.loader.exec_module(module)
        module.integration_harness = integration_harness
        return module
    finally:
        if saved is not None:
            sys.modules["harness"] = saved
        else:
            sys.modules.pop("harness", None)


class SlaveLayout:
    """A master with `policy`; `slave()` starts a slave of it and returns (process, host, port)."""

    def __init__(self, workdir: Path, policy: dict) -> None:
        self.ch = _cluster_harness()
        workdir.mkdir(parents=True, exist_ok=True)
        self.cluster = self.ch.Cluster(workdir)
        self.cluster.start_master(policy, args=["--workers", "1"])

    def slave(self, name: str, node_args: list[str], source_root: Path | None = None):
        node = self.cluster.slave(name, host=f"127.0.0.{20 + len(self.cluster.slaves)}",
                                  args=["--workers", "1", *node_args])
        env = {"PYTHONPATH": str(source_root)} if source_root is not None else None
        node.listening_file.unlink(missing_ok=True)
        node.node = self.ch.integration_harness.start_node(node.workdir, policy=None, args=node.args, name=node.name,
                                                           host=node.host, wait=False, env=env)
        try:
            node.wait_listening(60)
            node.wait_health(200, 60)
        except BaseException:
            print(node.node.log_tails())
            raise
        return node.node.process, node.proxy[0], node.proxy[1], node.node.twistd_log

    def stop(self) -> None:
        self.cluster.stop_all()
