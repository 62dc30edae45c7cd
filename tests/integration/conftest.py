"""Fixtures of the integration suite: origin servers, node processes, logs on failure."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import origins as origin_servers  # noqa: E402


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        nodes = harness.live_nodes()
        if nodes:
            report.sections.append(("safesquid node logs", "\n\n".join(n.log_tails() for n in nodes)))


class NodeFactory:
    """Starts nodes under one directory and stops every one of them when its scope ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[harness.Node] = []
        self._serial = itertools.count(1)

    def start(self, policy=None, args=(), name: str | None = None, **kwargs) -> harness.Node:
        name = f"{name or 'node'}{next(self._serial)}"
        node = harness.start_node(self.workdir, policy=policy, args=list(args), name=name, **kwargs)
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def origins(tmp_path_factory):
    servers = origin_servers.start_origins(tmp_path_factory.mktemp("origins"))
    yield servers
    servers.stop()


@pytest.fixture
def node_factory(tmp_path):
    """Nodes that live for one test."""
    factory = NodeFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_node_factory(tmp_path_factory, request):
    """Nodes shared by the tests of one module."""
    factory = NodeFactory(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]))
    yield factory
    factory.stop_all()
