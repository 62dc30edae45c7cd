"""The `/api/v1/` API: bearer tokens, JSON errors, policy, history, cluster tasks, reports, backup."""

from __future__ import annotations

import json

import pytest
from portalkit import POLICY, Portal
from twisted.internet import defer

from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.reporting.sqlitestore import ReportStore


class FakeSession:
    def __init__(self, answer=None) -> None:
        self.tasks: list[str] = []
        self.answer = answer

    def send_task(self, task: str) -> defer.Deferred:
        self.tasks.append(task)
        return self.answer if self.answer is not None else defer.succeed(f"{task} done")

    def is_alive(self) -> defer.Deferred:
        return defer.succeed(True)

    def disconnect(self, reason: str) -> None:
        pass


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path)


@pytest.fixture
def api(portal):
    token = portal.api_token()
    client = portal.client()
    headers = {"Authorization": f"Bearer {token}"}

    def call(method: str, path: str, body=None, **kwargs):
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            headers_ = dict(headers, **{"Content-Type": "application/json"})
        else:
            headers_ = headers
        return client.request(method, path, headers=headers_, **kwargs)

    return call


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/policy"), ("POST", "/api/v1/policy"), ("GET", "/api/v1/policy/versions"),
    ("GET", "/api/v1/policy/versions/1"), ("GET", "/api/v1/policy/diff?from=1&to=1"),
    ("POST", "/api/v1/policy/rollback"), ("GET", "/api/v1/cluster"), ("POST", "/api/v1/cluster/n1/tasks"),
    ("GET", "/api/v1/reports/dashboard"), ("GET", "/api/v1/reports/requests"), ("GET", "/api/v1/backup"),
    ("POST", "/api/v1/restore"), ("GET", "/api/v1/nothing"),
])
def test_every_call_without_a_token_is_401_json(portal, method, path):
    client = portal.client()
    for headers in ({}, {"Authorization": "Bearer sstw_wrong"}, {"Authorization": "Basic YWRtaW46YWRtaW4="}):
        response = client.request(method, path, headers=headers)
        assert response.code == 401
        assert response.header("content-type") == "application/json"
        assert response.header("www-authenticate") == 'Bearer realm="safesquid-tw"'
        assert "token" in response.json()["error"]
        assert response.header("location") is None


def test_a_portal_session_is_no_api_credential(portal):
    admin = portal.admin()
    assert admin.get("/api/v1/policy").code == 401


def test_get_policy_versions_and_one_version(api, portal):
    current = api("GET", "/api/v1/policy").json()
    assert current["version"] == 1 and current["digest"] == portal.store.current.digest
    assert current["document"]["access"]["rules"][0]["name"] == "block-games"
    versions = api("GET", "/api/v1/policy/versions").json()["versions"]
    assert versions[0]["version"] == 1 and versions[0]["applied_by"] == "policy file"
    one = api("GET", "/api/v1/policy/versions/1").json()
    assert one["document"] == current["document"]
    assert api("GET", "/api/v1/policy/versions/5").code == 404
    assert api("GET", "/api/v1/policy/versions/x").code == 400


def test_post_policy_makes_a_version_or_422_keeping_the_running_one(api, portal):
    document = json.loads(json.dumps(POLICY))
    document["access"]["rules"].append({"name": "block-ads", "action": "deny", "domains": ["ads.test"]})
    created = api("POST", "/api/v1/policy", {"document": document, "comment": "ads"})
    assert created.code == 201
    assert created.json() == {"version": 2, "digest": portal.store.current.digest, "changed": True, "warnings": []}
    assert portal.history.info(2).applied_by.startswith("token automation")
    same = api("POST", "/api/v1/policy", {"document": document})
    assert same.code == 200 and same.json()["changed"] is False
    document["access"]["rules"][1]["domains"] = ["*."]
    refused = api("POST", "/api/v1/policy", {"document": document, "comment": "bad"})
    assert refused.code == 422
    body = refused.json()
    assert body["path"] == "access.rules[1] (block-ads).domains[0]"
    assert body["message"] and body["running_version"] == 2
    assert portal.store.current.version == 2
    assert api("POST", "/api/v1/policy", {"comment": "no document"}).code == 400
    events = [e for e in portal.audit() if e["event"] == "apply"]
    assert len(events) == 1 and events[0]["via"] == "api"


def test_body_that_is_not_json(portal):
    token = portal.api_token()
    response = portal.client().request("POST", "/api/v1/policy", data=b"{not json",
                                       headers={"Authorization": f"Bearer {token}"})
    assert response.code == 400 and "not JSON" in response.json()["error"]


def test_diff_and_rollback(api, portal):
    document = json.loads(json.dumps(POLICY))
    document["access"]["default_action"] = "deny"
    api("POST", "/api/v1/policy", {"document": document})
    diff = api("GET", "/api/v1/policy/diff?from=1&to=2").json()
    assert '-    "default_action": "allow"' in diff["diff"] and '+    "default_action": "deny"' in diff["diff"]
    assert api("GET", "/api/v1/policy/diff?from=1").code == 400
    rolled = api("POST", "/api/v1/policy/rollback", {"version": 1, "comment": "undo"})
    assert rolled.code == 201 and rolled.json()["version"] == 3 and rolled.json()["rolled_back_to"] == 1
    assert portal.store.current.document["access"]["default_action"] == "allow"
    assert api("POST", "/api/v1/policy/rollback", {"version": 42}).code == 404


def test_cluster_view_and_tasks(tmp_path):
    registry = SlaveRegistry(clock=lambda: 1_800_000_000.0)
    session = FakeSession()
    registry.attach("n1", session, address="10.0.0.5", product_version="1")
    registry.record("n2").clock_offset = 9.0
    portal = Portal(tmp_path, role="master", registry=registry)
    token = portal.api_token()
    client = portal.client()
    auth = {"Authorization": f"Bearer {token}"}
    view = client.get("/api/v1/cluster", headers=auth).json()
    assert view["policy_version"] == 1
    assert [n["name"] for n in view["nodes"]] == ["n1", "n2"]
    assert "not connected" in view["nodes"][1]["warnings"]
    sent = client.request("POST", "/api/v1/cluster/n1/tasks", data=b'{"task": "drain"}', headers=auth)
    assert sent.code == 200 and sent.json() == {"node": "n1", "task": "drain", "ok": True, "outcome": "drain done"}
    assert session.tasks == ["drain"]
    assert client.request("POST", "/api/v1/cluster/n1/tasks", data=b'{"task": "explode"}', headers=auth).code == 422
    assert client.request("POST", "/api/v1/cluster/n2/tasks", data=b'{"task": "reload"}', headers=auth).code == 404
    assert portal.audit()[-1]["event"] == "task" and portal.audit()[-1]["node"] == "n1"


def test_a_task_without_answer_times_out(tmp_path):
    registry = SlaveRegistry()
    registry.attach("n1", FakeSession(answer=defer.Deferred()), address="10.0.0.5", product_version="1")
    portal = Portal(tmp_path, role="master", registry=registry)
    token = portal.api_token()
    client = portal.client()
    d = client.stub.request("POST", "http://portal.test/api/v1/cluster/n1/tasks", data=b'{"task": "reload"}',
                            headers={"Authorization": f"Bearer {token}"})
    client.stub.flush()
    response = []
    d.addCallback(response.append)
    assert response == []
    portal.clock.advance(16)
    client.stub.flush()
    assert response[0].code == 502


def test_reports_api(tmp_path):
    reports = ReportStore(tmp_path / "reports.sqlite3")
    now = 1_800_000_000.0
    records = [json.dumps({"ts": now - 600 + i, "client": "10.0.0.9", "user": "alice", "method": "GET",
                           "url": f"http://site{i % 3}.test/p", "status": 200 if i % 4 else 403,
                           "action": "allow" if i % 4 else "deny", "rule": None if i % 4 else "block-games",
                           "bytes_in": 100, "bytes_out": 1000}).encode() for i in range(40)]
    reports.ingest("n1", 1, 1, records)
    portal = Portal(tmp_path, reports=reports, wall_start=now)
    token = portal.api_token()
    client = portal.client()
    auth = {"Authorization": f"Bearer {token}"}
    dashboard = client.get("/api/v1/reports/dashboard?period=hour", headers=auth).json()
    assert dashboard["totals"]["requests"] == 40 and dashboard["totals"]["blocked"] == 10
    assert dashboard["top"]["rule"][0]["key"] == "block-games"
    assert len(dashboard["timeline"]) == 60 or len(dashboard["timeline"]) == 61
    assert client.get("/api/v1/reports/dashboard?period=year", headers=auth).code == 400
    found = client.get("/api/v1/reports/requests?period=day&status=403&page_size=3&page=2", headers=auth).json()
    assert found["total"] == 10 and found["pages"] == 4 and len(found["records"]) == 3
    assert all(r["status"] == 403 for r in found["records"])
    assert "dashboard_data" in portal.threads.calls and "search_data" in portal.threads.calls


def test_backup_and_restore_api(tmp_path, api, portal):
    document = json.loads(json.dumps(POLICY))
    document["comment"] = "second"
    api("POST", "/api/v1/policy", {"document": document, "comment": "two"})
    backup = api("GET", "/api/v1/backup").json()
    assert [v["version"] for v in backup["versions"]] == [1, 2]
    refused = api("POST", "/api/v1/restore", backup)
    assert refused.code == 409
    fresh = Portal(tmp_path / "fresh")
    token = fresh.api_token()
    response = fresh.client().request("POST", "/api/v1/restore", data=json.dumps(backup).encode(),
                                      headers={"Authorization": f"Bearer {token}"})
    assert response.code == 200, response.text
    assert fresh.store.current.digest == portal.store.current.digest
    broken = dict(backup, format="something else")
    fresher = Portal(tmp_path / "fresher")
    token = fresher.api_token()
    response = fresher.client().request("POST", "/api/v1/restore", data=json.dumps(broken).encode(),
                                        headers={"Authorization": f"Bearer {token}"})
    assert response.code == 422 and "not a backup" in response.json()["error"]


def test_slave_api_is_read_only(tmp_path):
    portal = Portal(tmp_path, role="slave", master_address="10.0.0.1:8888")
    token = portal.api_token()
    client = portal.client()
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/policy", headers=auth).code == 200
    refused = client.request("POST", "/api/v1/policy", data=b'{"document": {}}', headers=auth)
    assert refused.code == 409 and refused.json()["master"] == "10.0.0.1:8888"
    assert client.get("/api/v1/reports/dashboard", headers=auth).code == 404


def test_wrong_method_on_an_api_address(api):
    response = api("DELETE", "/api/v1/policy")
    assert response.code == 405 and "GET" in response.header("allow")
