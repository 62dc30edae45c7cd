"""Strict HTTP/1 framing and the proxy's own limits, over raw sockets.

Every refusal must leave the proxy serving new connections.
"""

from __future__ import annotations

import time

import pytest

import harness
from harness import RawConnection, build_request, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MAX_REQUEST_LINE = 1024
MAX_HEADER_BYTES = 4096
HEAD_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
MAX_REQUEST_BODY = 1 << 20
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    return module_node_factory.start(policy=harness.make_policy(), name="strict", args=[
        "--max-request-line", str(MAX_REQUEST_LINE),
        "--max-header-bytes", str(MAX_HEADER_BYTES),
        "--head-timeout", str(HEAD_TIMEOUT),
        "--idle-timeout", str(IDLE_TIMEOUT),
        "--max-request-body", str(MAX_REQUEST_BODY),
    ])


def assert_still_serves(node, origins) -> None:
    response = proxy_request(node, "GET", origins.url("/still-serving"))
    assert response.status == 200
    assert response.json()["target"] == "/still-serving"


def bad_request_cases():
    """(id, head-and-body template, expected status); {o} is the origin's host:port."""
    return [
        ("cl-and-te", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("te-and-cl", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n"
                      "Content-Length: 5\r\n\r\n0\r\n\r\n", 400),
        ("duplicate-cl-different", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n"
                                   "Content-Length: 7\r\n\r\nhello", 400),
        ("duplicate-cl-same", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n"
                              "Content-Length: 5\r\n\r\nhello", 400),
        ("cl-list", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
        ("cl-letters", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: abc\r\n\r\n", 400),
        ("cl-negative", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: -1\r\n\r\n", 400),
        ("cl-plus", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: +5\r\n\r\nhello", 400),
        ("cl-huge", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nContent-Length: 99999999999999999999999\r\n\r\n",
         400),
        ("te-not-chunked", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        ("bad-chunk-size", "POST http://{o}/f HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "zz\r\nhello\r\n0\r\n\r\n", 400),
        ("bare-lf-in-header", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\nX-A: b\r\n\r\n", 400),
        ("nul-in-header", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\nX-A: a\x00b\r\n\r\n", 400),
        ("obs-fold", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\nX-A: a\r\n  folded\r\n\r\n", 400),
        ("space-before-colon", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\nX-A : b\r\n\r\n", 400),
        ("no-colon", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\nnot a header\r\n\r\n", 400),
        ("bad-version", "GET http://{o}/f HTTP/9.9\r\nHost: {o}\r\n\r\n", None),
        ("garbage-request-line", "GARBAGE\r\n\r\n", 400),
        ("two-hosts", "GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\nHost: other.invalid\r\n\r\n", 400),
    ]


@pytest.mark.parametrize("template, expected", [c[1:] for c in bad_request_cases()],
                         ids=[c[0] for c in bad_request_cases()])
def test_bad_framing_is_refused_and_the_connection_closed(node, origins, template, expected):
    data = template.format(o=origins.authority()).encode("latin-1")
    response = harness.raw_request(node.proxy, data, close_wait=3)
    if expected is None:
        assert 400 <= response.status < 600, response
    else:
        assert response.status == expected, response
    assert response.closed, "the connection must be closed after a framing error"
    assert_still_serves(node, origins)


def test_request_line_over_the_limit_is_414(node, origins):
    path = "/" + "a" * (MAX_REQUEST_LINE + 100)
    response = harness.raw_request(node.proxy, build_request("GET", origins.url(path)), close_wait=3)
    assert response.status == 414
    assert_still_serves(node, origins)


def test_request_line_under_the_limit_passes(node, origins):
    path = "/" + "a" * (MAX_REQUEST_LINE - 100)
    response = proxy_request(node, "GET", origins.url(path))
    assert response.status == 200


def test_header_section_over_the_limit_is_431(node, origins):
    headers = [(f"X-Filler-{i}", "v" * 200) for i in range(MAX_HEADER_BYTES // 200 + 5)]
    response = harness.raw_request(node.proxy, build_request("GET", origins.url("/big-head"), headers),
                                   close_wait=3)
    assert response.status == 431
    assert_still_serves(node, origins)


def test_slowloris_head_is_cut_off_at_the_head_timeout(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(f"GET {origins.url('/slowloris')} HTTP/1.1\r\n".encode())
        started = time.monotonic()
        cut_after = None
        for byte in b"X-Slow: " + b"s" * 60:  # one byte per 0.2 s: at most 13.6 s
            try:
                conn.send(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - started
                break
            if conn.wait_closed(0.2) is not None:
                cut_after = time.monotonic() - started
                break
    assert cut_after is not None, "a head trickling in for 13 s was never cut off"
    assert HEAD_TIMEOUT * 0.7 <= cut_after <= HEAD_TIMEOUT + 4, cut_after
    assert_still_serves(node, origins)


def test_request_body_over_the_limit_is_413(node, origins):
    data = build_request("POST", origins.url("/too-big"), headers=[("Content-Length", str(MAX_REQUEST_BODY + 1))])
    response = harness.raw_request(node.proxy, data, close_wait=3)
    assert response.status == 413
    assert_still_serves(node, origins)


def test_chunked_request_body_over_the_limit_is_413(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("POST", origins.url("/too-big-chunked"), headers=[("Transfer-Encoding", "chunked")]))
        piece = b"c" * 65536
        try:
            for _ in range(MAX_REQUEST_BODY // len(piece) + 4):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the proxy may stop reading and close once the limit is passed
        response = conn.read_response(timeout=10)
    assert response.status == 413
    assert_still_serves(node, origins)


def test_body_at_the_limit_passes(node, origins):
    response = proxy_request(node, "POST", origins.url("/at-limit"), body=b"b" * MAX_REQUEST_BODY)
    assert response.status == 200
    assert response.json()["body_len"] == MAX_REQUEST_BODY


def test_idle_keep_alive_connection_is_closed(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", origins.url("/idle")))
        assert conn.read_response().status == 200
        elapsed = conn.wait_closed(IDLE_TIMEOUT + 8)
    assert elapsed is not None, "an idle keep-alive connection stayed open"
    assert elapsed >= IDLE_TIMEOUT * 0.7


def test_busy_keep_alive_connection_is_not_closed_by_the_idle_timeout(node, origins):
    with RawConnection(node.proxy) as conn:
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < IDLE_TIMEOUT * 2:
            conn.send(build_request("GET", origins.url(f"/busy/{i}")))
            assert conn.read_response().status == 200
            i += 1
            time.sleep(IDLE_TIMEOUT / 4)


def test_max_connections(module_node_factory, origins):
    node = module_node_factory.start(policy=harness.make_policy(), name="maxconn",
                                     args=["--max-connections", str(MAX_CONNECTIONS)])
    first = [RawConnection(node.proxy) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, conn in enumerate(first):
            conn.send(build_request("GET", origins.url(f"/maxconn/{i}")))
            assert conn.read_response().status == 200
        # One more than allowed: refused with 503, or closed without an answer.
        try:
            with RawConnection(node.proxy, timeout=5) as extra:
                extra.send(build_request("GET", origins.url("/maxconn/extra")))
                try:
                    response = extra.read_response(timeout=5)
                    assert response.status == 503, response
                except harness.IncompleteResponse:
                    pass
        except OSError:
            pass
        # The first N still work.
        for i, conn in enumerate(first):
            conn.send(build_request("GET", origins.url(f"/maxconn/{i}/again")))
            assert conn.read_response().status == 200
    finally:
        for conn in first:
            conn.close()

    def served():
        try:
            return proxy_request(node, "GET", origins.url("/maxconn/after"), timeout=3).status == 200
        except (OSError, AssertionError):
            return False

    harness.wait_until(served, 10, "a new connection to be served once the others closed", interval=0.2)
