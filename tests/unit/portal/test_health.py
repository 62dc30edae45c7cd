import json

import pytest
from twisted.web.test.requesthelper import DummyRequest

from safesquid_tw.nodestate import NodeState
from safesquid_tw.portal.health import HealthResource


def request(method: bytes, postpath=None) -> DummyRequest:
    req = DummyRequest(postpath if postpath is not None else [])
    req.method = method
    req.uri = b"/health"
    return req


def header(req, name):
    values = req.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"policy_version": 2}, 200),
        ({}, 503),
        ({"policy_version": 2, "draining": True}, 503),
        ({"policy_version": 2, "shutting_down": True}, 503),
    ],
)
def test_get_reports_readiness_as_status_and_json(changes, code):
    state = NodeState(role="slave", node="n1", **changes)
    req = request(b"GET")
    body = HealthResource(state).render(req)
    assert req.responseCode == code
    assert json.loads(body) == state.as_health_json()
    assert header(req, b"content-type") == b"application/json"
    assert header(req, b"cache-control") == b"no-store"
    assert header(req, b"content-length") == b"%d" % len(body)


def test_state_changes_show_up_at_once():
    state = NodeState(role="slave", node="n1")
    resource = HealthResource(state)
    assert json.loads(resource.render(request(b"GET")))["ready"] is False
    state.policy_version = 5
    req = request(b"GET")
    assert json.loads(resource.render(req))["policy_version"] == 5
    assert req.responseCode == 200


def test_head_has_headers_and_no_body():
    req = request(b"HEAD")
    body = HealthResource(NodeState(role="master", node="m", policy_version=1)).render(req)
    assert body == b""
    assert req.responseCode == 200
    assert int(header(req, b"content-length")) > 0


@pytest.mark.parametrize("ready, code", [(True, 200), (False, 503)])
def test_options(ready, code):
    req = request(b"OPTIONS")
    body = HealthResource(NodeState(role="slave", node="n", policy_version=1 if ready else None)).render(req)
    assert body == b""
    assert req.responseCode == code
    assert header(req, b"allow") == b"GET, HEAD, OPTIONS"


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"TRACE"])
def test_other_methods_are_refused(method):
    req = request(method)
    body = HealthResource(NodeState(role="slave", node="n", policy_version=1)).render(req)
    assert req.responseCode == 405
    assert header(req, b"allow") == b"GET, HEAD, OPTIONS"
    assert b"Method not allowed" in body


def test_paths_below_health_are_not_found():
    req = request(b"GET", postpath=[b"extra"])
    HealthResource(NodeState(role="slave", node="n", policy_version=1)).render(req)
    assert req.responseCode == 404
