"""Failures on the way to the origin: error pages, Proxy-Status (RFC 9209), event log lines."""

from __future__ import annotations

import time

import pytest

import harness
from harness import proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RESPONSE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    return module_node_factory.start(policy=harness.make_policy(), name="upstream",
                                     args=["--response-timeout", str(RESPONSE_TIMEOUT), "--connect-timeout", "3"])


def assert_error_page(response, status: int, error: str) -> None:
    assert response.status == status, response
    assert "text/html" in (response.header("content-type") or ""), response.headers
    assert b"<html" in response.body.lower() or b"<!doctype html" in response.body.lower()
    proxy_status = response.header("proxy-status") or ""
    assert error in proxy_status, f"Proxy-Status {proxy_status!r} does not name {error}"


def test_unresolvable_name_is_502_dns_error(node):
    mark = node.extended_mark()
    response = proxy_request(node, "GET", "http://does-not-exist.invalid/page")
    assert_error_page(response, 502, "dns_error")
    node.wait_for_extended(lambda line: "does-not-exist.invalid" in line and "dns_error" in line, since=mark,
                           what="an event line about the failed lookup")
    record = node.wait_for_url("does-not-exist.invalid")
    assert record["status"] == 502


def test_refused_connection_is_502_connection_refused(node):
    port = harness.closed_port()
    mark = node.extended_mark()
    response = proxy_request(node, "GET", f"http://127.0.0.1:{port}/refused")
    assert_error_page(response, 502, "connection_refused")
    node.wait_for_extended(lambda line: str(port) in line and "connection_refused" in line, since=mark,
                           what="an event line about the refused connection")
    assert node.wait_for_url(f"127.0.0.1:{port}/refused")["status"] == 502


def test_silent_origin_is_504_after_the_response_timeout(node, origins):
    mark = node.extended_mark()
    started = time.monotonic()
    response = proxy_request(node, "GET", origins.url("/never-answers", name="silent"), timeout=20)
    elapsed = time.monotonic() - started
    assert_error_page(response, 504, "http_response_timeout")
    assert RESPONSE_TIMEOUT * 0.7 <= elapsed <= RESPONSE_TIMEOUT + 5, elapsed
    node.wait_for_extended(lambda line: str(origins.ports["silent"]) in line and "http_response_timeout" in line,
                           since=mark, what="an event line about the response timeout")
    assert node.wait_for_url("/never-answers")["status"] == 504


def test_slow_origin_within_the_timeout_is_fine(node, origins):
    response = proxy_request(node, "GET", origins.url(f"/slow?delay={RESPONSE_TIMEOUT / 4}"))
    assert response.status == 200


def test_trickling_body_is_not_cut_by_the_response_timeout(node, origins):
    # The response timeout covers the wait for the head only; the body may take longer.
    response = proxy_request(node, "GET", origins.url(f"/trickle?chunks=10&size=100&interval={RESPONSE_TIMEOUT / 5}"),
                             timeout=30)
    assert response.status == 200
    assert len(response.body) == 1000


def test_node_keeps_serving_after_upstream_failures(node, origins):
    for _ in range(3):
        assert proxy_request(node, "GET", f"http://127.0.0.1:{harness.closed_port()}/x").status == 502
    assert proxy_request(node, "GET", origins.url("/after-failures")).status == 200
