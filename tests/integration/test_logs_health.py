"""Access log, event log, /health and log rotation of a standalone node."""

from __future__ import annotations

import json

import pytest

import harness
from harness import proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NODE_NAME = "logs-test-node"
ACCESS_FIELDS = ("time", "ts", "node", "client", "user", "method", "url", "status", "bytes_in", "bytes_out",
                 "duration_ms", "action", "rule", "category", "application", "policy_version", "dlp", "detail", "tls")


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    policy = harness.make_policy(rules=[{"name": "block-logged", "action": "deny", "domains": ["blocked.invalid"]}])
    return module_node_factory.start(policy=policy, name="logs", args=["--node-name", NODE_NAME])


def test_one_access_record_per_request_with_every_field(node, origins):
    urls = [origins.url(f"/log/one/{i}") for i in range(3)]
    for url in urls:
        assert proxy_request(node, "GET", url).status == 200
    upload = origins.url("/respond?size=20000&log=upload")
    assert proxy_request(node, "POST", upload, body=b"p" * 5000).status == 200
    assert proxy_request(node, "GET", "http://blocked.invalid/log/blocked").status == 403
    sentinel = origins.url("/log/sentinel")
    assert proxy_request(node, "GET", sentinel).status == 200
    node.wait_for_access(lambda r: r.get("url") == sentinel, what="the sentinel record")

    records = node.access_records()
    for url in [*urls, upload, "http://blocked.invalid/log/blocked"]:
        matching = [r for r in records if r.get("url") == url]
        assert len(matching) == 1, f"{len(matching)} records for {url}"
    for record in records:
        missing = [f for f in ACCESS_FIELDS if f not in record]
        assert not missing, f"record without {missing}: {record}"

    first = next(r for r in records if r["url"] == urls[0])
    assert first["method"] == "GET"
    assert first["status"] == 200
    assert first["node"] == NODE_NAME
    assert "127.0.0.1" in str(first["client"])
    assert first["policy_version"] == 1
    assert isinstance(first["ts"], (int, float)) and first["ts"] > 1.6e9
    assert isinstance(first["duration_ms"], (int, float)) and first["duration_ms"] >= 0
    assert isinstance(first["time"], str) and first["time"][:2] == "20"

    posted = next(r for r in records if r["url"] == upload)
    assert posted["method"] == "POST"
    small, large = sorted([posted["bytes_in"], posted["bytes_out"]])
    assert small >= 5000 and large >= 20000, posted

    blocked = next(r for r in records if r["url"] == "http://blocked.invalid/log/blocked")
    assert blocked["status"] == 403 and blocked["rule"] == "block-logged"


def test_credentials_in_the_url_are_not_logged(node, origins):
    url = f"http://user:secret@{origins.authority()}/cred-check"
    response = harness.raw_request(node.proxy, harness.build_request("GET", url, host=origins.authority()),
                                   close_wait=0)
    assert response.status == 400  # userinfo in a request target is refused outright
    curl = harness.curl("-x", node.proxy_url, f"http://user:secret@{origins.authority()}/cred-curl")
    assert curl.returncode == 0, curl.stderr
    record = node.wait_for_url("/cred-curl")  # curl moves them into an Authorization field
    assert "user:" not in record["url"]
    assert "secret" not in node.access_log.read_text()
    assert "secret" not in node.extended_text()


def test_extended_log_has_start_and_policy_lines(node):
    text = node.extended_text()
    lines = text.lower().splitlines()
    assert any("start" in line for line in lines), text[-2000:]
    assert any("policy" in line and ("load" in line or "version" in line) for line in lines), text[-2000:]


def test_health(node):
    status, document = node.health()
    assert status == 200
    assert document is not None, "GET /health must answer JSON"
    assert document["role"] == "standalone"
    assert document["node"] == NODE_NAME
    assert document["policy_version"] == 1
    assert document["ready"] is True


def test_health_content_type_is_json(node):
    response = harness.raw_request(node.portal, b"GET /health HTTP/1.1\r\nHost: portal\r\n\r\n", close_wait=0)
    assert response.status == 200
    assert (response.header("content-type") or "").startswith("application/json")
    json.loads(response.body)


def test_haproxy_default_check_is_answered(node):
    response = harness.raw_request(node.portal, b"OPTIONS / HTTP/1.0\r\n\r\n", close_wait=0)
    assert response.status == 200


def all_access_records(node) -> list[dict]:
    """Records of access.log and its rotated files."""
    records = []
    for path in sorted(node.logs_dir.glob("access.log*")):
        if path.suffix in (".tmp",):
            continue
        for line in path.read_bytes().split(b"\n")[:-1]:
            if line.strip():
                records.append(json.loads(line))
    return records


def test_access_log_rotation(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), name="rotate",
                              args=["--log-rotate-bytes", "2000", "--log-keep", "3"])
    for batch in range(8):
        for i in range(5):
            assert proxy_request(node, "GET", origins.url(f"/rotate/{batch}/{i}")).status == 200
        marker = f"/rotate/{batch}/4"
        harness.wait_until(lambda: any(marker in str(r.get("url")) for r in all_access_records(node)), 5,
                           f"the record of {marker}")
    harness.wait_until(lambda: (node.logs_dir / "access.log.1").exists(), 5, "access.log.1")
    assert not (node.logs_dir / "access.log.4").exists(), "--log-keep 3 kept more than 3 rotated files"
    assert node.access_log.stat().st_size < 20000
