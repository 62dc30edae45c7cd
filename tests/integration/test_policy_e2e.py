"""The policy document (docs/policy-format.md) enforced end to end through the proxy.

Hosts that a test expects to be blocked are under .invalid or .test and are never looked up:
the decision comes before any connection. Requests expected to pass go to the test origins.
"""

from __future__ import annotations

import hashlib

import time

import pytest

import harness
from harness import assert_blocked, assert_passed, basic_credentials, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DENY_ACTIONS = ("deny", "block", "blocked", "denied")


# --------------------------------------------------------------------------------------------
# Access rules
# --------------------------------------------------------------------------------------------


def rules_policy(origins) -> dict:
    today = time.localtime().tm_wday
    other_day = DAYS[(today + 3) % 7]  # far from today on both sides of midnight
    return harness.make_policy(
        rules=[
            {"name": "block-domain", "action": "deny", "reason": "Domain blocked by the tests",
             "domains": ["blocked.invalid"]},
            {"name": "block-wildcard", "action": "deny", "reason": "Wildcard domain", "domains": ["*.wild.invalid"]},
            {"name": "block-pattern", "action": "deny", "reason": "Forbidden path", "url_patterns": ["*/forbidden/*"]},
            {"name": "block-delete", "action": "deny", "methods": ["DELETE"], "url_patterns": ["*/method-check*"]},
            {"name": "block-port", "action": "deny", "ports": [origins.ports["http2"]]},
            {"name": "block-my-network", "action": "deny", "clients": ["127.0.0.0/24"],
             "url_patterns": ["*/client-mine*"]},
            {"name": "block-other-network", "action": "deny", "clients": ["10.0.0.0/8", "192.168.7.7"],
             "url_patterns": ["*/client-other*"]},
            {"name": "block-gambling", "action": "deny", "reason": "Gambling", "categories": ["gambling"]},
            {"name": "block-badapp", "action": "deny", "applications": ["badapp"]},
            {"name": "sched-always", "action": "deny", "url_patterns": ["*/sched-always*"],
             "schedule": {"days": DAYS, "from": "00:00", "to": "24:00"}},
            {"name": "sched-other-day", "action": "deny", "url_patterns": ["*/sched-other*"],
             "schedule": {"days": [other_day], "from": "00:00", "to": "24:00"}},
            {"name": "disabled-rule", "action": "deny", "enabled": False, "url_patterns": ["*/disabled-rule*"]},
            {"name": "allow-exception", "action": "allow", "url_patterns": ["*/ordered/exception*"]},
            {"name": "block-ordered", "action": "deny", "url_patterns": ["*/ordered/*"]},
        ],
        categories={"gambling": {"description": "Games of chance", "domains": ["casino.invalid"]}},
        applications=[{"name": "badapp", "description": "An application told by its user agent",
                       "hosts": ["localhost"], "headers": {"user-agent": "BadApp*"}}],
    )


@pytest.fixture(scope="module")
def rules_node(module_node_factory, origins):
    return module_node_factory.start(policy=rules_policy(origins), name="rules")


def test_domain_rule_blocks_with_a_block_page(rules_node):
    response = proxy_request(rules_node, "GET", "http://blocked.invalid/some/page")
    assert_blocked(response, "block-domain", "Domain blocked by the tests")
    record = rules_node.wait_for_url("blocked.invalid/some/page")
    assert record["status"] == 403
    assert record["rule"] == "block-domain"
    assert str(record["action"]).lower() in DENY_ACTIONS


@pytest.mark.parametrize("host", ["BLOCKED.invalid", "blocked.invalid."])
def test_domain_rule_ignores_case_and_trailing_dot(rules_node, host):
    assert_blocked(proxy_request(rules_node, "GET", f"http://{host}/"), "block-domain")


@pytest.mark.parametrize("host", ["wild.invalid", "a.wild.invalid", "deep.er.wild.invalid"])
def test_wildcard_domain_matches_itself_and_subdomains(rules_node, host):
    assert_blocked(proxy_request(rules_node, "GET", f"http://{host}/"), "block-wildcard", "Wildcard domain")


def test_wildcard_domain_does_not_match_a_lookalike(rules_node):
    response = proxy_request(rules_node, "GET", "http://notwild.invalid/")
    assert response.status == 502, "notwild.invalid is not under wild.invalid: it should pass and fail to resolve"


def test_url_pattern(rules_node, origins):
    assert_blocked(proxy_request(rules_node, "GET", origins.url("/a/forbidden/b")), "block-pattern", "Forbidden path")
    assert_passed(proxy_request(rules_node, "GET", origins.url("/a/allowed/b")))


def test_method(rules_node, origins):
    assert_blocked(proxy_request(rules_node, "DELETE", origins.url("/method-check")), "block-delete")
    assert assert_passed(proxy_request(rules_node, "GET", origins.url("/method-check")))["method"] == "GET"


def test_port(rules_node, origins):
    assert_blocked(proxy_request(rules_node, "GET", origins.url("/port-check", name="http2")), "block-port")
    assert_passed(proxy_request(rules_node, "GET", origins.url("/port-check")))


def test_client_network(rules_node, origins):
    assert_blocked(proxy_request(rules_node, "GET", origins.url("/client-mine")), "block-my-network")
    assert_passed(proxy_request(rules_node, "GET", origins.url("/client-other")))


@pytest.mark.parametrize("host", ["casino.invalid", "www.casino.invalid"])
def test_category(rules_node, host):
    assert_blocked(proxy_request(rules_node, "GET", f"http://{host}/cat"), "block-gambling", "Gambling")
    record = rules_node.wait_for_url(f"{host}/cat")
    assert record["category"] == "gambling"


def test_application_by_header(rules_node, origins):
    url = f"http://localhost:{origins.ports['http']}/app-check"
    assert_blocked(proxy_request(rules_node, "GET", url, headers=[("User-Agent", "BadApp/2.1")]), "block-badapp")
    record = rules_node.wait_for_url("/app-check")
    assert record["application"] == "badapp"
    response = proxy_request(rules_node, "GET", url, headers=[("User-Agent", "GoodApp/1.0")])
    assert response.status != 403 and "block-badapp" not in response.text


def test_schedule(rules_node, origins):
    assert_blocked(proxy_request(rules_node, "GET", origins.url("/sched-always")), "sched-always")
    assert_passed(proxy_request(rules_node, "GET", origins.url("/sched-other")))


def test_disabled_rule_does_not_match(rules_node, origins):
    assert_passed(proxy_request(rules_node, "GET", origins.url("/disabled-rule")))


def test_first_matching_rule_wins(rules_node, origins):
    assert_passed(proxy_request(rules_node, "GET", origins.url("/ordered/exception")))
    assert_blocked(proxy_request(rules_node, "GET", origins.url("/ordered/other")), "block-ordered")


def test_default_deny(node_factory, origins):
    policy = harness.make_policy(default_action="deny", rules=[
        {"name": "allow-one-path", "action": "allow", "url_patterns": ["*/only-this*"]}])
    node = node_factory.start(policy=policy, name="default-deny")
    assert_passed(proxy_request(node, "GET", origins.url("/only-this")))
    response = proxy_request(node, "GET", origins.url("/anything-else"))
    assert response.status == 403


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------

REALM = "safesquid-tests"
PASSWORDS = {"alice": "wonderland", "bob": "builder"}


def auth_policy(exempt: list[str]) -> dict:
    from argon2 import PasswordHasher

    hasher = PasswordHasher()
    return harness.make_policy(
        rules=[
            {"name": "staff-blocked", "action": "deny", "reason": "Not for staff", "groups": ["staff"],
             "url_patterns": ["*/staff-blocked*"]},
            {"name": "bob-blocked", "action": "deny", "users": ["bob"], "url_patterns": ["*/bob-blocked*"]},
        ],
        authentication={"enabled": True, "realm": REALM, "exempt_networks": exempt},
        groups=[{"name": "staff", "description": "Office staff"}],
        users=[
            {"name": "alice", "password_hash": hasher.hash(PASSWORDS["alice"]), "groups": ["staff"]},
            {"name": "bob", "password_hash": hasher.hash(PASSWORDS["bob"]), "groups": []},
        ],
    )


@pytest.fixture(scope="module")
def auth_node(module_node_factory, origins):
    return module_node_factory.start(policy=auth_policy(["10.0.0.0/8"]), name="auth")


def as_user(user: str, password: str | None = None) -> list[tuple[str, str]]:
    return [("Proxy-Authorization", basic_credentials(user, password or PASSWORDS[user]))]


def test_no_credentials_is_407_with_a_basic_challenge(auth_node, origins):
    response = proxy_request(auth_node, "GET", origins.url("/auth/none"))
    assert response.status == 407
    challenge = response.header("proxy-authenticate") or ""
    assert challenge.startswith("Basic ") and f'realm="{REALM}"' in challenge, challenge


@pytest.mark.parametrize("credentials", [
    basic_credentials("alice", "wrong"),
    basic_credentials("mallory", "wonderland"),
    "Basic not-base64!!",
    "Bearer abc",
], ids=["wrong-password", "unknown-user", "garbage", "not-basic"])
def test_wrong_credentials_are_407(auth_node, origins, credentials):
    response = proxy_request(auth_node, "GET", origins.url("/auth/wrong"),
                             headers=[("Proxy-Authorization", credentials)])
    assert response.status == 407


def test_origin_authorization_header_does_not_authenticate_to_the_proxy(auth_node, origins):
    response = proxy_request(auth_node, "GET", origins.url("/auth/origin-header"),
                             headers=[("Authorization", basic_credentials("alice", PASSWORDS["alice"]))])
    assert response.status == 407


def test_right_credentials_pass_and_name_the_user(auth_node, origins):
    echo = assert_passed(proxy_request(auth_node, "GET", origins.url("/auth/right"), headers=as_user("alice")))
    assert not harness.echo_headers(echo, "proxy-authorization")
    record = auth_node.wait_for_url("/auth/right")
    assert record["user"] == "alice"


def test_a_body_sent_while_credentials_are_checked_is_forwarded_whole(auth_node, origins):
    # A user seen for the first time under this policy version: the password is checked in a
    # worker thread while the body is already arriving; none of it may be lost or reordered.
    payload = bytes(range(256)) * 300
    node = auth_node
    with harness.RawConnection(node.proxy) as conn:
        head = harness.build_request("POST", origins.url("/auth/upload"), headers=[
            ("Proxy-Authorization", basic_credentials("bob", PASSWORDS["bob"])),
            ("Content-Length", str(len(payload))),
        ])
        conn.send(head + payload)
        response = conn.read_response()
    echo = assert_passed(response)
    assert echo["body_len"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_curl_proxy_user(auth_node, origins):
    result = harness.curl("-x", auth_node.proxy_url, "--proxy-user", "bob:builder", origins.url("/auth/curl"))
    assert result.status == 200, result.stderr
    assert auth_node.wait_for_url("/auth/curl")["user"] == "bob"


def test_group_rule(auth_node, origins):
    assert_blocked(proxy_request(auth_node, "GET", origins.url("/staff-blocked"), headers=as_user("alice")),
                   "staff-blocked", "Not for staff")
    assert_passed(proxy_request(auth_node, "GET", origins.url("/staff-blocked"), headers=as_user("bob")))


def test_user_rule(auth_node, origins):
    assert_blocked(proxy_request(auth_node, "GET", origins.url("/bob-blocked"), headers=as_user("bob")),
                   "bob-blocked")
    assert_passed(proxy_request(auth_node, "GET", origins.url("/bob-blocked"), headers=as_user("alice")))


def test_exempt_network_needs_no_credentials(node_factory, origins):
    node = node_factory.start(policy=auth_policy(["127.0.0.1/32"]), name="exempt")
    assert_passed(proxy_request(node, "GET", origins.url("/exempt")))
    # an unauthenticated request never matches a group rule
    assert_passed(proxy_request(node, "GET", origins.url("/staff-blocked")))
    record = node.wait_for_url("/exempt")
    assert not record.get("user")
