"""The portal Site driven through an in-memory transport: the whole twisted.web stack, no sockets."""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from safesquid_tw.nodestate import NodeState
from safesquid_tw.pages import stylesheet
from safesquid_tw.portal.site import make_portal_site

SECURITY = {
    b"content-security-policy": b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"server": b"safesquid-tw",
}


def portal(state, **kwargs):
    """A started portal Site whose timers run on a fake clock."""
    site = make_portal_site(state, reactor=Clock(), **kwargs)
    site.doStart()  # as listening would: this is where twisted.web opens its request log
    return site


def exchange(site, raw: bytes):
    """Send one raw request; return (status, headers, body) of the response."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    protocol.connectionLost(None)
    return int(status_line.split()[1]), headers, body


@pytest.fixture
def state():
    return NodeState(role="standalone", node="gw1", policy_version=3, policy_digest="sha256:abc",
                     policy_source="file", started=100.0, now=lambda: 190.0)


def get(site, path: bytes, method: bytes = b"GET"):
    return exchange(site, method + b" " + path + b" HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n\r\n")


def assert_security_headers(headers):
    for name, value in SECURITY.items():
        assert headers.get(name) == value, name


def test_status_page(state):
    code, headers, body = get(portal(state), b"/")
    assert code == 200
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert_security_headers(headers)
    for text in (b"gw1", b"standalone", b"sha256:abc", b"file", b"1m 30s", b"Ready"):
        assert text in body
    assert b'href="/static/style.css"' in body
    assert b"<style" not in body and b"<script" not in body


def test_health(state):
    code, headers, body = get(portal(state), b"/health")
    assert code == 200
    assert json.loads(body)["node"] == "gw1"
    assert headers[b"cache-control"] == b"no-store"
    assert_security_headers(headers)
    state.draining = True
    code, _, body = get(portal(state), b"/health")
    assert code == 503 and json.loads(body)["status"] == "draining"


@pytest.mark.parametrize("path", [b"/", b"*"])
@pytest.mark.parametrize("version, code", [(3, 200), (None, 503)])
def test_options_probe_follows_readiness(state, path, version, code):
    state.policy_version = version
    site = portal(state)
    for raw in (b"OPTIONS " + path + b" HTTP/1.0\r\n\r\n", b"OPTIONS " + path + b" HTTP/1.1\r\nHost: p\r\n\r\n"):
        status, headers, body = exchange(site, raw)
        assert status == code
        assert headers[b"allow"] == b"GET, HEAD, OPTIONS"
        assert body == b""
        assert_security_headers(headers)


def test_star_takes_only_options(state):
    code, headers, _ = get(portal(state), b"*")
    assert code == 405
    assert headers[b"allow"] == b"OPTIONS"


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_other_methods_get_our_405_page(state, method):
    code, headers, body = exchange(
        portal(state), method + b" / HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n"
    )
    assert code == 405
    assert headers[b"allow"] == b"GET, HEAD, OPTIONS"
    assert b"Method not allowed" in body
    assert_security_headers(headers)


@pytest.mark.parametrize("path", [b"/nope", b"/static/", b"/static/other.css", b"/health/x", b"/%3Cscript%3E"])
def test_unknown_paths_get_our_404_page(state, path):
    code, headers, body = get(portal(state), path)
    assert code == 404
    assert b"Not found" in body and b"safesquid-tw" in body
    assert b"<script>" not in body
    assert_security_headers(headers)


def test_stylesheet(state):
    code, headers, body = get(portal(state), b"/static/style.css")
    assert code == 200
    assert headers[b"content-type"] == b"text/css; charset=utf-8"
    assert body == stylesheet()


def test_head_of_the_status_page(state):
    code, headers, body = get(portal(state), b"/", method=b"HEAD")
    assert code == 200
    assert body == b""
    assert int(headers[b"content-length"]) > 0


def test_extra_resources_are_mounted(state):
    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"hello"

    code, headers, body = get(portal(state, extra={b"hello": Hello()}), b"/hello")
    assert (code, body) == (200, b"hello")
    assert_security_headers(headers)


def test_a_failing_resource_gives_our_500_page_without_a_traceback(state):
    class Broken(Resource):
        isLeaf = True

        def render_GET(self, request):
            raise RuntimeError("secret internals")

    from twisted.logger import capturedLogs

    with capturedLogs() as events:
        code, headers, body = get(portal(state, extra={b"broken": Broken()}), b"/broken")
    assert code == 500
    assert b"Internal error" in body
    assert b"secret internals" not in body
    assert_security_headers(headers)
    assert any("log_failure" in e for e in events)


def test_requests_are_not_logged(state):
    from twisted.logger import capturedLogs

    site = portal(state)
    with capturedLogs() as events:
        get(site, b"/")
        get(site, b"/health")
    assert events == []
