"""The cluster page and its tasks on a master; the startup parameters and restart on a slave."""

from __future__ import annotations

import json

import pytest
from portalkit import Portal
from .test_api import FakeSession

from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.portal.startup import StartupParams


@pytest.fixture
def registry():
    registry = SlaveRegistry(clock=lambda: 1_800_000_000.0)
    registry.attach("n1", FakeSession(), address="10.0.0.5", product_version="1")
    record = registry.attach("n<i>2</i>", FakeSession(), address="10.0.0.6", product_version="1")
    record.clock_offset = -7.5
    record.policy_version = 1
    return registry


def test_cluster_page_shows_nodes_with_warnings_standing_out(tmp_path, registry):
    portal = Portal(tmp_path, role="master", registry=registry)
    page = portal.admin().get("/cluster")
    assert page.code == 200
    assert 'id="cluster-table"' in page.text and 'data-source="/cluster/nodes.json"' in page.text
    row = page.text.split('data-node="n&lt;i&gt;2&lt;/i&gt;"')
    assert len(row) == 2 and "<i>2</i>" not in page.text
    assert 'class="warn-row"' in page.text
    assert "clock is -7.5 s off" in page.text
    assert "-7.5 s" in page.text
    assert page.text.count('name="task" value="drain"') == 2


def test_cluster_json_needs_a_session_and_matches_the_api(tmp_path, registry):
    portal = Portal(tmp_path, role="master", registry=registry)
    assert portal.client().get("/cluster/nodes.json").code == 303
    view = portal.admin().get("/cluster/nodes.json").json()
    token = portal.api_token()
    api = portal.client().get("/api/v1/cluster", headers={"Authorization": f"Bearer {token}"}).json()
    assert view == api
    assert [n["name"] for n in view["nodes"]] == ["n1", "n<i>2</i>"]


def test_task_buttons_send_tasks_and_report_the_outcome(tmp_path, registry):
    portal = Portal(tmp_path, role="master", registry=registry)
    admin = portal.admin()
    response = admin.post("/cluster/task", {"node": "n1", "task": "drain"})
    assert response.code == 303
    assert registry.sessions["n1"].tasks == ["drain"]
    assert "drain on n1: drain done" in admin.get("/cluster").text
    admin.post("/cluster/task", {"node": "gone", "task": "reload"})
    assert "not connected" in admin.get("/cluster").text
    assert [e["task"] for e in portal.audit() if e["event"] == "task"] == ["drain", "reload"]
    refused = admin.post("/cluster/task", {"node": "n1", "task": "drain", "csrf": "forged"})
    assert refused.code == 403 and registry.sessions["n1"].tasks == ["drain"]


def test_standalone_node_page(tmp_path):
    portal = Portal(tmp_path)
    page = portal.admin().get("/cluster")
    assert page.code == 200 and "This node" in page.text and "gw1" in page.text
    assert portal.admin().post("/cluster/task", {"node": "x", "task": "drain"}).code == 409


@pytest.fixture
def slave(tmp_path):
    restarts = []
    params = StartupParams(tmp_path / "state", restart=lambda: restarts.append(True))
    portal = Portal(tmp_path, role="slave", master_address="10.0.0.1:8888", startup_params=params)
    portal.restarts = restarts
    return portal


def test_slave_names_its_master_and_edits_its_startup_parameters(slave):
    admin = slave.admin()
    page = admin.get("/cluster")
    assert "10.0.0.1:8888" in page.text and "/node/startup" in page.text
    bad = admin.post("/node/startup", {"master": "10.0.0.2", "listen": "tcp:3128", "portal": "", "node_name": "s1"})
    assert bad.code == 422
    field = bad.text.split('id="sp-master"')[1].split("</div>")[0]
    assert "is not HOST:PORT" in field
    assert 'value="10.0.0.2"' in bad.text and 'value="tcp:3128"' in bad.text
    ok = admin.post("/node/startup", {"master": "10.0.0.2:8888", "listen": "tcp:3128:interface=10.0.0.7",
                                      "portal": "", "node_name": "s1"})
    assert ok.code == 303
    saved = json.loads((slave.state_dir / "startup.json").read_text())
    assert saved == {"master": "10.0.0.2:8888", "listen": "tcp:3128:interface=10.0.0.7", "node_name": "s1"}
    assert 'value="10.0.0.2:8888"' in admin.get("/node/startup").text
    assert slave.audit()[-1]["event"] == "startup_params"


def test_slave_restart_button(slave):
    admin = slave.admin()
    response = admin.post("/node/restart")
    assert response.code == 200 and "Restarting" in response.text
    assert slave.restarts == [True]
    assert slave.audit()[-1]["event"] == "restart"


def test_no_startup_page_without_startup_parameters(tmp_path):
    portal = Portal(tmp_path)
    assert portal.admin().get("/node/startup").code == 404


def test_nodes_are_remembered_across_restarts_and_can_be_removed(tmp_path):
    path = str(tmp_path / "nodes.json")
    first = SlaveRegistry(clock=lambda: 1_800_000_000.0, path=path)
    first.attach("n1", FakeSession(), address="10.0.0.5", product_version="1")
    first.attach("n2", FakeSession(), address="10.0.0.6", product_version="1")
    first.records["n1"].policy_version = 3
    first.detach("n2", first.sessions["n2"])
    # The master restarts: every node is listed, none connected, until it returns.
    registry = SlaveRegistry(clock=lambda: 1_800_000_100.0, path=path)
    assert sorted(registry.records) == ["n1", "n2"]
    assert not any(rec.connected for rec in registry.records.values())
    assert registry.records["n1"].address == "10.0.0.5"
    assert "not connected" in registry.records["n1"].warnings(3)
    registry.attach("n1", FakeSession(), address="10.0.0.5", product_version="1")

    portal = Portal(tmp_path, role="master", registry=registry)
    admin = portal.admin()
    page = admin.get("/cluster").text
    assert page.count('name="task" value="remove"') == 1  # only the node that is gone
    admin.post("/cluster/task", {"node": "n1", "task": "remove"})
    assert "n1" in registry.records  # connected: not removed
    token = portal.api_token()
    headers = {"Authorization": f"Bearer {token}"}
    response = portal.client().request("DELETE", "/api/v1/cluster/n2", headers=headers)
    assert response.code == 200 and response.json()["removed"] is True
    assert sorted(SlaveRegistry(path=path).records) == ["n1"]
    assert portal.client().request("DELETE", "/api/v1/cluster/n2", headers=headers).code == 404
    assert portal.client().request("DELETE", "/api/v1/cluster/n1", headers=headers).code == 409
    assert [e["node"] for e in portal.audit() if e["event"] == "remove_node"] == ["n1", "n2", "n1"]
