"""Portal abuse limits: bodies refused from the head alone, bounded form parsing, CSRF only from
the body or a header, HSTS over TLS, deeply nested JSON, parallel logins checked one at a time
per account and address, and a node-wide cap on concurrent password checks."""

from __future__ import annotations

import json

import pytest
from portalkit import Portal
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from safesquid_tw.portal.bodylimits import ANONYMOUS_BODY, LOGIN_BODY, MAX_FORM_FIELDS
from safesquid_tw.portal.throttle import LoginThrottle
from safesquid_tw.portal.worklimit import Busy, WorkLimiter


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path)


def raw_connection(portal: Portal) -> tuple[object, StringTransport]:
    channel = portal.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_huge_login_body_is_refused_from_its_head_without_reading_it(portal):
    channel, transport = raw_connection(portal)
    channel.dataReceived(b"POST /login HTTP/1.1\r\nHost: portal.test\r\nExpect: 100-continue\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024))
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert b"Connection: close" in answer
    assert transport.disconnecting  # the body is never read
    assert b"x-frame-options: deny" in answer.lower()


def test_a_chunked_login_body_is_refused_once_it_passes_the_limit(portal):
    channel, transport = raw_connection(portal)
    channel.dataReceived(b"POST /login HTTP/1.1\r\nHost: portal.test\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    chunk = b"a" * 4096
    for _ in range(LOGIN_BODY // len(chunk) + 2):
        if transport.disconnecting:
            break
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_without_a_session_a_page_takes_no_large_body(portal):
    channel, transport = raw_connection(portal)
    channel.dataReceived(b"POST /policy/apply HTTP/1.1\r\nHost: portal.test\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         b"Content-Length: %d\r\n\r\n" % (ANONYMOUS_BODY + 1))
    assert transport.value().startswith(b"HTTP/1.1 413 ")


def test_a_small_login_body_is_still_read(portal):
    response = portal.client().post("/login", {"name": "admin", "password": "x" * 100}, csrf=False)
    assert response.code == 403  # no login token: refused as a form, not as a size


def test_an_administrator_may_send_a_larger_form_but_not_too_many_fields(portal):
    client = portal.admin()
    response = client.post("/policy/apply", {"comment": "x" * (ANONYMOUS_BODY * 2)})
    assert response.code != 413
    fields = {f"f{i}": "1" for i in range(MAX_FORM_FIELDS + 1)}
    response = client.post("/policy/apply", fields)
    assert response.code == 400
    assert "more than" in response.text


def test_csrf_token_in_the_query_string_is_refused(portal):
    client = portal.admin()
    response = client.request("POST", f"/tokens/create?csrf={client.csrf}", data={"name": "ci"})
    assert response.code == 403
    assert "CSRF" in response.text
    both = client.request("POST", f"/tokens/create?csrf={client.csrf}", data={"name": "ci", "csrf": client.csrf})
    assert both.code == 403


def test_csrf_token_in_a_header_is_accepted(portal):
    client = portal.admin()
    response = client.request("POST", "/tokens/create", data={"name": "ci"}, headers={"X-CSRF-Token": client.csrf})
    assert response.code == 200
    wrong = client.request("POST", "/tokens/create", data={"name": "ci2", "csrf": client.csrf},
                           headers={"X-CSRF-Token": "forged"})
    assert wrong.code == 403


def test_hsts_over_tls_only(portal):
    assert portal.client("https").get("/login").header("strict-transport-security") == "max-age=31536000"
    assert portal.client("http").get("/login").header("strict-transport-security") is None


def test_deeply_nested_json_answers_400(portal):
    token = portal.api_token()
    body = b"[" * 200_000 + b"]" * 200_000
    response = portal.client().request("POST", "/api/v1/policy", data=body,
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/json"})
    assert response.code == 400
    assert "nested" in response.json()["error"]


def test_multipart_upload_is_parsed_in_a_worker_thread(portal):
    client = portal.admin()
    before = len(portal.threads.calls)
    boundary = "xYzBoundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{client.csrf}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"backup\"; filename=\"b.json\"\r\n"
            f"Content-Type: application/json\r\n\r\n{{}}\r\n--{boundary}--\r\n").encode()
    response = client.request("POST", "/backup/restore", data=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.code in (409, 422)  # refused for what it holds, after a parse in a thread
    assert any("parse" in name for name in portal.threads.calls[before:])


def test_parallel_attempts_for_one_account_or_address_are_checked_one_at_a_time():
    throttle = LoginThrottle(lambda: 0.0)
    assert throttle.begin("admin", "192.0.2.1")
    assert not throttle.begin("admin", "192.0.2.2")  # same account
    assert not throttle.begin("root", "192.0.2.1")  # same address
    throttle.end("admin", "192.0.2.1")
    assert throttle.begin("root", "192.0.2.1")


def test_password_checks_are_capped_and_the_queue_is_short():
    pending: list[defer.Deferred] = []

    def in_thread(fn, *args, **kwargs):
        d = defer.Deferred()
        pending.append(d)
        return d

    limiter = WorkLimiter(in_thread, concurrency=2, max_waiting=3)
    results = [limiter.run(lambda: None) for _ in range(10)]
    assert len(pending) == 2  # two running
    assert limiter.waiting == 3
    refused = []
    for d in results[5:]:
        d.addErrback(lambda f: refused.append(f.trap(Busy)))
    assert len(refused) == 5
    pending[0].callback(True)
    assert len(pending) == 3  # the next waiting one started
    assert limiter.peak_running == 2


def test_a_login_flood_from_one_address_hashes_once(tmp_path):
    portal = Portal(tmp_path)
    gate: list[defer.Deferred] = []
    hashed: list[str] = []
    real = portal.threads

    def slow_in_thread(fn, *args, **kwargs):
        if getattr(fn, "__name__", "") == "verify":
            hashed.append(args[0])
            d = defer.Deferred()
            gate.append(d)
            return d.addCallback(lambda _: fn(*args, **kwargs))
        return real(fn, *args, **kwargs)

    portal.services.passwords._run_in_thread = slow_in_thread
    client = portal.client()
    page = client.get("/login")
    from portalkit import LOGIN_TOKEN
    token = LOGIN_TOKEN.search(page.body).group(1).decode()
    answers = []
    stubs = []
    for i in range(50):
        stub = portal.client().stub  # a client of its own each: the login cookie stays the first one
        stubs.append(stub)
        d = stub.request("POST", "http://portal.test/login", allow_redirects=False,
                         cookies={"safesquid_login": token},
                         data={"name": "admin", "password": f"wrong-{i}", "login_token": token})
        d.addCallback(lambda r: answers.append(r.code))
    for stub in stubs:
        stub.flush()
    assert len(hashed) == 1
    assert answers.count(429) == 49
    gate[0].callback(None)
    for stub in stubs:
        stub.flush()
    assert sorted(set(answers)) == [401, 429]


def test_refused_logins_cost_two_audit_lines_per_window_and_lose_no_count(tmp_path):
    portal = Portal(tmp_path)
    refusals = portal.services.refusals
    before = len(portal.audit())
    for i in range(300):
        refusals.refused("admin", f"192.0.2.{i % 3}", "another attempt in flight")
    assert len(portal.audit()) == before + 1  # the first one, at once
    portal.advance(refusals.window)
    lines = portal.audit()[before:]
    assert len(lines) == 2
    assert sum(lines[1]["repeated"].values()) + lines[1]["repeated_elsewhere"] == 299
    assert lines[1]["outcome"] == "refused" and lines[1]["accounts"] == ["admin"]
