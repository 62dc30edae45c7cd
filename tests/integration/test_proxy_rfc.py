"""RFC 9110/9112 duties of a proxy: hop-by-hop fields, Via, Max-Forwards, the URL's host, loops."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest

import harness
from harness import echo_headers, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

VIA = re.compile(r"^(HTTP/)?1\.[01] \S+")


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    policy = harness.make_policy(rules=[
        {"name": "block-host", "action": "deny", "reason": "host blocked for the RFC tests",
         "domains": ["blocked.invalid"]},
    ])
    return module_node_factory.start(policy=policy, name="rfc")


REQUEST_HOP_BY_HOP = [
    ("Connection", "keep-alive, X-Custom-Hop"),
    ("Keep-Alive", "timeout=5, max=7"),
    ("TE", "trailers, deflate"),
    ("Trailer", "X-Trailer-Field"),
    ("Upgrade", "h2c"),
    ("Proxy-Connection", "keep-alive"),
    ("X-Custom-Hop", "must-not-pass"),
    ("Proxy-Authorization", harness.basic_credentials("user", "pass")),
    ("X-End-To-End", "kept"),
]


def test_hop_by_hop_request_headers_are_not_forwarded(node, origins):
    response = proxy_request(node, "GET", origins.url("/hop/request"), headers=REQUEST_HOP_BY_HOP)
    assert response.status == 200
    echo = response.json()
    for name in ("keep-alive", "trailer", "upgrade", "proxy-connection", "x-custom-hop", "proxy-authorization"):
        assert not echo_headers(echo, name), f"{name} reached the origin: {echo['headers']}"
    assert all("deflate" not in v for v in echo_headers(echo, "te")), "the client's TE reached the origin"
    for value in echo_headers(echo, "connection"):
        assert "x-custom-hop" not in value.lower()
    assert echo_headers(echo, "x-end-to-end") == ["kept"]


def test_proxy_authorization_never_reaches_the_origin(node, origins):
    response = proxy_request(node, "POST", origins.url("/hop/proxy-auth"), body=b"x",
                             headers=[("Proxy-Authorization", harness.basic_credentials("alice", "s3cret"))])
    assert response.status == 200
    echo = response.json()
    assert not echo_headers(echo, "proxy-authorization")
    assert "s3cret" not in response.text and "YWxpY2U6czNjcmV0" not in response.text


def test_hop_by_hop_response_headers_are_not_returned(node, origins):
    fields = ["Connection:X-Origin-Hop", "X-Origin-Hop:must-not-pass", "Keep-Alive:timeout=99",
              "Proxy-Connection:keep-alive", "Upgrade:h2c", "Trailer:X-Trailer-Field", "X-Kept:yes"]
    query = "&".join("h=" + quote(f, safe="") for f in fields)
    response = proxy_request(node, "GET", origins.url(f"/respond?{query}&body=hello"))
    assert response.status == 200
    assert response.body == b"hello"
    for name in ("x-origin-hop", "proxy-connection", "upgrade", "trailer"):
        assert not response.has_header(name), f"{name} reached the client: {response.headers}"
    assert all("99" not in v for v in response.header_values("keep-alive"))
    assert all("x-origin-hop" not in v.lower() for v in response.header_values("connection"))
    assert response.header("x-kept") == "yes"


def test_via_is_added_both_ways(node, origins):
    response = proxy_request(node, "GET", origins.url("/via"))
    assert response.status == 200
    request_via = echo_headers(response.json(), "via")
    assert request_via and VIA.match(request_via[-1]), request_via
    assert response.has_header("via") and VIA.match(response.header_values("via")[-1]), response.headers


def test_via_is_appended_to_an_existing_one(node, origins):
    response = proxy_request(node, "GET", origins.url("/via/append"), headers=[("Via", "1.0 upstream-proxy")])
    via = ", ".join(echo_headers(response.json(), "via"))
    assert via.startswith("1.0 upstream-proxy, "), via
    assert VIA.match(via.split(", ", 1)[1])


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_zero_is_answered_by_the_proxy(node, origins, method):
    target = origins.url(f"/max-forwards/zero/{method.lower()}")
    response = proxy_request(node, method, target, headers=[("Max-Forwards", "0"), ("X-Trace-Me", "yes")])
    assert response.status == 200
    assert b'"conn"' not in response.body, "the request was forwarded to the origin"
    if method == "TRACE":
        assert (response.header("content-type") or "").startswith("message/http")
        assert response.body.startswith(b"TRACE ")
        assert b"X-Trace-Me: yes" in response.body


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_is_decremented(node, origins, method):
    response = proxy_request(node, method, origins.url(f"/max-forwards/three/{method.lower()}"),
                             headers=[("Max-Forwards", "3")])
    assert response.status == 200
    echo = response.json()
    assert echo["method"] == method
    assert echo_headers(echo, "max-forwards") == ["2"]


def test_url_host_wins_over_a_conflicting_host_header(node, origins):
    response = proxy_request(node, "GET", origins.url("/host/conflict"), headers=[("Host", "blocked.invalid")])
    assert response.status == 200, "the policy must decide on the URL's host, not the Host header"
    assert echo_headers(response.json(), "host") == [origins.authority()]


def test_blocked_url_host_with_an_allowed_host_header_is_blocked(node, origins):
    response = proxy_request(node, "GET", "http://blocked.invalid/host/conflict",
                             headers=[("Host", origins.authority())])
    assert response.status == 403
    assert "block-host" in response.text


def test_request_to_the_proxy_itself_is_refused(node):
    own = f"http://{node.proxy[0]}:{node.proxy[1]}/loop"
    response = proxy_request(node, "GET", own, timeout=15)
    assert 400 <= response.status < 600
    assert node.health()[0] == 200


def _respond_url(origins, **params) -> str:
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return origins.url(f"/respond?{query}")


def test_a_response_carries_exactly_one_content_length(node, origins):
    response = proxy_request(node, "GET", _respond_url(origins, body="twelve bytes"))
    lengths = [v for n, v in response.headers if n.lower() == "content-length"]
    assert lengths == ["12"]
    assert response.body == b"twelve bytes"


def test_head_keeps_the_origin_length_without_a_body(node, origins):
    with harness.RawConnection(node.proxy) as conn:
        conn.send(harness.build_request("HEAD", _respond_url(origins, size=5000)))
        response = conn.read_response(head_request=True)
        lengths = [v for n, v in response.headers if n.lower() == "content-length"]
        assert response.status == 200 and lengths == ["5000"] and response.body == b""
        # The connection is still in step: a second request on it is answered normally.
        conn.send(harness.build_request("GET", _respond_url(origins, body="after-head")))
        assert conn.read_response().body == b"after-head"
