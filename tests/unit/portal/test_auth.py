"""Portal access: login, sessions and their expiry, CSRF, throttling, headers, allow list, accounts,
tokens and the audit trail, through the Site a node serves (StubTreq, no sockets)."""

from __future__ import annotations

import os
import stat

import pytest
from portalkit import LOGIN_TOKEN, Portal
from twisted.logger import globalLogPublisher

from safesquid_tw.portal.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT

CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path)


def test_first_start_creates_admin_with_a_password_file_and_logs_where_it_is(tmp_path):
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        portal = Portal(tmp_path)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    path = portal.state_dir / "admin-password"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(portal.admin_password) >= 20
    text = " ".join(str(e.get("log_format", "")) + " " + str(e.get("path", "")) for e in logged)
    assert str(path) in text and "admin" in text
    assert portal.admin_password not in text
    accounts = (portal.state_dir / "portal" / "accounts.json").read_text()
    assert "$argon2id$" in accounts and portal.admin_password not in accounts


def test_a_second_start_keeps_the_accounts_and_writes_no_new_password(tmp_path):
    from portalkit import CHEAP_HASHER

    from safesquid_tw.portal.accounts import AccountStore

    first = Portal(tmp_path)
    (first.state_dir / "admin-password").unlink()
    again = AccountStore(first.state_dir, hasher=CHEAP_HASHER)
    assert again.ensure_initial_admin() is None
    assert not (first.state_dir / "admin-password").exists()
    assert again.verify("admin", first.admin_password)
    assert not again.verify("admin", "wrong") and not again.verify("nobody", first.admin_password)


@pytest.mark.parametrize("path", ["/", "/policy", "/policy/access", "/cluster", "/reports", "/accounts", "/tokens",
                                  "/audit", "/backup", "/policy/history"])
def test_pages_redirect_to_login_without_a_session(portal, path):
    response = portal.client().get(path)
    assert response.code == 303
    assert response.header("location").startswith("/login?next=")


def test_health_and_options_need_no_login(portal):
    client = portal.client()
    assert client.get("/health").code == 200
    options = client.request("OPTIONS", "/")
    assert options.code == 200 and options.body == b""
    portal.state.draining = True
    assert client.request("OPTIONS", "/").code == 503
    assert client.get("/health").code == 503


def test_login_sets_a_strict_http_only_cookie_and_no_secure_flag_over_plain_http(portal):
    client = portal.client()
    response = client.login()
    cookie = next(c for c in response.headers_all("set-cookie") if c.startswith("safesquid_session="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie
    assert len(cookie.split(";")[0].split("=", 1)[1]) >= 43  # 256 bits, base64
    assert response.header("location") == "/"


def test_cookie_is_secure_over_tls(portal):
    client = portal.client(scheme="https")
    page = client.get("/login")
    token = LOGIN_TOKEN.search(page.body).group(1).decode()
    response = client.request("POST", "/login", data={"name": "admin", "password": portal.admin_password,
                                                      "login_token": token})
    cookies = response.headers_all("set-cookie")
    assert any(c.startswith("safesquid_session=") and "; Secure" in c for c in cookies)


def test_login_goes_back_to_next_but_never_to_another_site(portal):
    client = portal.client()
    page = client.get("/login?next=/policy/history")
    token = LOGIN_TOKEN.search(page.body).group(1).decode()
    response = client.request("POST", "/login", data={"name": "admin", "password": portal.admin_password,
                                                      "login_token": token, "next": "/policy/history"})
    assert response.header("location") == "/policy/history"
    other = portal.client()
    page = other.get("/login")
    token = LOGIN_TOKEN.search(page.body).group(1).decode()
    response = other.request("POST", "/login", data={"name": "admin", "password": portal.admin_password,
                                                     "login_token": token, "next": "//evil.example/x"})
    assert response.header("location") == "/"


def test_login_form_without_its_token_is_refused(portal):
    client = portal.client()
    response = client.request("POST", "/login", data={"name": "admin", "password": portal.admin_password})
    assert response.code == 403
    assert not portal.services.sessions._sessions


def test_wrong_password_is_refused_and_audited(portal):
    client = portal.client()
    response = client.login(password="not-the-password", expect=401)
    assert "Wrong name or password" in response.text
    assert portal.client().get("/").code == 303
    assert portal.audit()[-1]["event"] == "login" and portal.audit()[-1]["outcome"] == "failed"
    assert "AccountStore.verify" in portal.threads.calls  # the argon2 check ran in a thread


def test_failed_logins_grow_delays_per_account(portal):
    client = portal.client()
    client.login(password="wrong-1", expect=401)
    client.login(password="wrong-2", expect=429)  # 1 s must pass after the first failure
    portal.advance(1.0)
    client.login(password="wrong-3", expect=401)  # second failure: 2 s
    portal.advance(1.5)
    refused = client.login(expect=429)  # even the right password waits
    assert refused.header("retry-after") == "1"
    assert "wait 1 s" in refused.text
    portal.advance(0.6)
    client.login()  # and then it works, and clears the count
    assert portal.services.throttle.wait("admin", "127.0.0.1") == 0


def test_failed_logins_from_one_address_slow_every_account_tried_from_it(portal):
    client = portal.client()
    for name, wait in (("alice", 1), ("bob", 2), ("carol", 4)):
        client.login(name=name, password="guess", expect=401)
        assert portal.services.throttle.wait("dave", "127.0.0.1") == wait  # dave never failed
        if name != "carol":
            client.login(name="dave", password="guess", expect=429)
            portal.advance(wait)
    client.login(name="dave", password="guess", expect=429)
    portal.services.throttle.succeeded("carol", "127.0.0.2")  # another address's success changes nothing
    assert portal.services.throttle.wait("dave", "127.0.0.1") == 4


def test_idle_session_expires(portal):
    client = portal.admin()
    portal.advance(IDLE_TIMEOUT - 1)
    assert client.get("/").code == 200  # activity restarts the idle timer
    portal.advance(IDLE_TIMEOUT - 1)
    assert client.get("/").code == 200
    portal.advance(IDLE_TIMEOUT)
    assert client.get("/").code == 303


def test_session_ends_after_its_absolute_lifetime_whatever_the_activity(portal):
    client = portal.admin()
    elapsed = 0.0
    while elapsed + IDLE_TIMEOUT / 2 < ABSOLUTE_TIMEOUT:
        portal.advance(IDLE_TIMEOUT / 2)
        elapsed += IDLE_TIMEOUT / 2
        assert client.get("/").code == 200
    portal.advance(ABSOLUTE_TIMEOUT - elapsed)
    assert client.get("/").code == 303


def test_logout_ends_the_session(portal):
    client = portal.admin()
    response = client.post("/logout")
    assert response.code == 303 and response.header("location") == "/login"
    assert client.get("/").code == 303
    assert portal.audit()[-1]["event"] == "logout"


@pytest.mark.parametrize("path, data", [
    ("/logout", {}),
    ("/tokens/create", {"name": "ci"}),
    ("/accounts/add", {"name": "eve", "password": "x" * 20, "password2": "x" * 20}),
    ("/policy/apply", {"comment": "x"}),
    ("/policy/rollback", {"version": "1"}),
    ("/policy/access/rules/new", {"name": "r2", "action": "deny"}),
])
def test_posts_without_the_sessions_csrf_token_are_refused(portal, path, data):
    client = portal.admin()
    for token in (None, "forged-token"):
        fields = dict(data, **({"csrf": token} if token else {}))
        response = client.post(path, fields, csrf=False)
        assert response.code == 403, path
        assert "CSRF" in response.text
    assert client.get("/").code == 200  # still logged in: nothing happened


def test_post_without_a_session_is_refused(portal):
    response = portal.client().post("/policy/apply", {"csrf": "x"}, csrf=False)
    assert response.code == 403


@pytest.mark.parametrize("path", ["/login", "/", "/policy/access", "/reports/requests", "/nonexistent"])
def test_security_headers_on_every_response(tmp_path, path):
    portal = Portal(tmp_path)
    client = portal.admin() if path != "/login" else portal.client()
    response = client.get(path)
    assert response.header("content-security-policy") == CSP
    assert response.header("x-content-type-options") == "nosniff"
    assert response.header("referrer-policy") == "no-referrer"
    assert response.header("x-frame-options") == "DENY"
    assert "<script>" not in response.text and " style=" not in response.text and "<style" not in response.text


def test_static_files_are_served(portal):
    client = portal.client()
    js = client.get("/static/portal.js")
    assert js.code == 200 and js.header("content-type").startswith("text/javascript")
    assert client.get("/static/portal.css").code == 200
    assert client.get("/static/style.css").code == 200
    assert client.get("/static/nothing.js").code == 404


def test_allow_list_closes_the_portal_and_api_to_other_addresses_but_not_health(tmp_path):
    policy = {"format": "safesquid-policy/1", "access": {"default_action": "allow"},
              "access_restriction": {"portal_allow": ["10.1.0.0/16"]}}
    portal = Portal(tmp_path, policy=policy)
    portal.from_address("192.0.2.9")
    client = portal.client()
    assert client.get("/login").code == 403
    assert client.get("/").code == 403
    token = portal.api_token()
    api = client.get("/api/v1/policy", headers={"Authorization": f"Bearer {token}"})
    assert api.code == 403 and api.json()["error"]
    assert client.get("/health").code == 200
    assert client.request("OPTIONS", "/").code == 200
    portal.from_address("10.1.2.3")
    assert client.get("/login").code == 200
    assert client.get("/api/v1/policy", headers={"Authorization": f"Bearer {token}"}).code == 200


def test_accounts_add_remove_and_password_change(portal):
    client = portal.admin()
    short = client.post("/accounts/add", {"name": "alice", "password": "short", "password2": "short"})
    assert short.code == 422 and "at least 12 characters" in short.text
    assert 'value="alice"' in short.text  # what was typed stays
    ok = client.post("/accounts/add", {"name": "alice", "password": "alice-password-1", "password2": "alice-password-1"})
    assert ok.code == 303
    alice = portal.client()
    alice.login("alice", "alice-password-1")
    assert client.post("/accounts/alice/remove").code == 303
    assert alice.get("/").code == 303  # her session ended with her account
    wrong = client.post("/accounts/password", {"account": "admin", "current_password": "nope",
                                               "new_password": "new-admin-password", "new_password2": "new-admin-password"})
    assert wrong.code == 422 and "not your current password" in wrong.text
    changed = client.post("/accounts/password", {"account": "admin", "current_password": portal.admin_password,
                                                 "new_password": "new-admin-password",
                                                 "new_password2": "new-admin-password"})
    assert changed.code == 303
    portal.client().login("admin", "new-admin-password")
    events = [e["event"] for e in portal.audit()]
    assert "account_add" in events and "account_remove" in events and "password_change" in events


def test_the_last_account_and_ones_own_cannot_be_removed(portal):
    client = portal.admin()
    client.post("/accounts/admin/remove")
    assert [a.name for a in portal.services.accounts.accounts()] == ["admin"]


def test_api_tokens_are_shown_once_stored_as_digests_and_revocable(portal):
    client = portal.admin()
    page = client.post("/tokens/create", {"name": "ci <script>alert(1)</script>"})
    assert page.code == 200
    secret = page.text.split('id="new-token">')[1].split("<")[0]
    assert secret.startswith("sstw_")
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text
    stored = (portal.state_dir / "portal" / "tokens.json").read_text()
    assert secret not in stored
    assert secret not in client.get("/tokens").text
    api = portal.client()
    assert api.get("/api/v1/policy", headers={"Authorization": f"Bearer {secret}"}).code == 200
    token_id = portal.services.tokens.tokens()[0].id
    assert client.post(f"/tokens/{token_id}/revoke").code == 303
    assert api.get("/api/v1/policy", headers={"Authorization": f"Bearer {secret}"}).code == 401
    events = [e["event"] for e in portal.audit()]
    assert events.count("token_create") == 1 and events.count("token_revoke") == 1


def test_audit_page_lists_logins(portal):
    client = portal.admin()
    page = client.get("/audit")
    assert page.code == 200 and "login" in page.text and "ok" in page.text
    line = portal.audit()[0]
    assert set(line) >= {"time", "event", "actor", "address", "outcome"}


def test_unknown_page_and_wrong_method(portal):
    client = portal.admin()
    assert client.get("/no/such/page").code == 404
    wrong = client.request("DELETE", "/policy")
    assert wrong.code == 405 and "GET" in wrong.header("allow")
