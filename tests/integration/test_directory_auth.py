"""Proxy users from a real OpenLDAP directory and real Kerberos tickets, through the real proxy."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap

import pytest

import harness
from cluster_harness import cluster  # noqa: F401 - fixture
from directory_servers import GROUPS, PROXY_NAME, SERVICE_PRINCIPAL, Kdc, Slapd
from harness import assert_blocked, assert_passed, basic_credentials, proxy_request

REALM = "directory-tests"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd")).start()
    yield server
    server.stop()


def directory_policy(slapd: Slapd, **directory) -> dict:
    return harness.make_policy(
        rules=[
            {"name": "engineers-only", "action": "deny", "reason": "Engineers only",
             "groups": ["contractors"], "url_patterns": ["*/engineering/*"]},
            {"name": "engineering-allowed", "action": "allow", "groups": ["engineering"],
             "url_patterns": ["*/engineering/*"]},
        ],
        authentication={"enabled": True, "realm": REALM, "directory": slapd.settings(**directory)},
        groups=[
            # by DN, reached through the nested group staff -> engineering
            {"name": "engineering", "directory_groups": [f"cn=engineering,{GROUPS}"]},
            # by the group's name
            {"name": "contractors", "directory_groups": ["contractors"]},
        ],
    )


def as_user(user: str, password: str) -> list[tuple[str, str]]:
    return [("Proxy-Authorization", basic_credentials(user, password))]


@pytest.fixture(scope="module")
def directory_node(module_node_factory, slapd):
    return module_node_factory.start(policy=directory_policy(slapd), name="directory")


def test_directory_user_with_the_right_password_passes_and_is_recorded(directory_node, origins):
    echo = assert_passed(proxy_request(directory_node, "GET", origins.url("/dir/right"),
                                       headers=as_user("alice", "alice-password")))
    assert not harness.echo_headers(echo, "proxy-authorization")
    record = directory_node.wait_for_url("/dir/right")
    assert record["user"] == "alice"
    assert record["groups"] == ["engineering"]


@pytest.mark.parametrize("user,password", [
    ("alice", "wrong-password"),
    ("alice", ""),  # an empty password is an anonymous bind: refused before binding
    ("nobody", "alice-password"),
    ("alice)(uid=*", "alice-password"),  # filter injection finds nobody
], ids=["wrong-password", "empty-password", "unknown-user", "filter-injection"])
def test_wrong_directory_credentials_are_407(directory_node, origins, user, password):
    response = proxy_request(directory_node, "GET", origins.url("/dir/wrong"), headers=as_user(user, password))
    assert response.status == 407
    assert "Basic" in (response.header("proxy-authenticate") or "")


def test_rules_on_directory_groups(directory_node, origins):
    # alice is in engineering through the nested group staff; bob is a contractor.
    assert_passed(proxy_request(directory_node, "GET", origins.url("/engineering/plan"),
                                headers=as_user("alice", "alice-password")))
    assert_blocked(proxy_request(directory_node, "GET", origins.url("/engineering/plan"),
                                 headers=as_user("bob", "bob-password")), "engineers-only", "Engineers only")


def test_curl_with_a_directory_user(directory_node, origins):
    result = harness.curl("-x", directory_node.proxy_url, "--proxy-user", "carol:carol-password",
                          origins.url("/dir/curl"))
    assert result.status == 200, result.stderr
    assert directory_node.wait_for_url("/dir/curl")["user"] == "carol"


def test_the_bind_password_never_reaches_a_log(directory_node, origins):
    assert_passed(proxy_request(directory_node, "GET", origins.url("/dir/secret-check"),
                                headers=as_user("alice", "alice-password")))
    directory_node.wait_for_url("/dir/secret-check")
    for path in directory_node.state_dir.rglob("*.log"):
        text = path.read_text(errors="replace")
        assert "directory-admin-password" not in text, path
        assert "alice-password" not in text, path


def test_directory_down_keeps_cached_users_and_refuses_new_ones(node_factory, origins, tmp_path):
    server = Slapd(tmp_path / "slapd-down").start()
    try:
        # One process: remembered directory verdicts are per worker (docs/ARCHITECTURE.md,
        # Workers), so with several a user seen by one worker is new to the next.
        node = node_factory.start(policy=directory_policy(server), args=["--workers", "1"], name="dirdown")
        assert_passed(proxy_request(node, "GET", origins.url("/down/alice-before"),
                                    headers=as_user("alice", "alice-password")))
        server.stop()
        # alice's verdict is still fresh: she keeps working while the directory is away
        assert_passed(proxy_request(node, "GET", origins.url("/down/alice-during"),
                                    headers=as_user("alice", "alice-password")))
        # carol was never seen: no silent allow, a clear 503 instead
        response = proxy_request(node, "GET", origins.url("/down/carol-during"),
                                 headers=as_user("carol", "carol-password"))
        assert response.status == 503, response.text[:300]
        assert "directory" in response.text
        record = node.wait_for_url("/down/carol-during")
        assert record["action"] == "error"
        server.start()
        harness.wait_until(
            lambda: proxy_request(node, "GET", origins.url("/down/carol-after"),
                                  headers=as_user("carol", "carol-password")).status == 200,
            timeout=15, what="carol to get in once the directory is back", interval=0.2)
        assert "user directory is unavailable" in node.twistd_log.read_text()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Kerberos
# --------------------------------------------------------------------------------------------

_TOKEN_SCRIPT = textwrap.dedent("""
    import base64, sys, gssapi
    name = gssapi.Name(sys.argv[1], gssapi.NameType.hostbased_service)
    ctx = gssapi.SecurityContext(name=name, usage="initiate")
    print(base64.b64encode(ctx.step()).decode())
""")


@pytest.fixture(scope="module")
def kdc(tmp_path_factory):
    pytest.importorskip("gssapi", reason="python-gssapi is installed by the test extras")
    server = Kdc(tmp_path_factory.mktemp("kdc")).start()
    yield server
    server.stop()


def spnego_token(kdc: Kdc, user: str, ccache) -> str:
    """A fresh SPNEGO token for the proxy's service, made by a client holding `user`'s ticket."""
    env = kdc.kinit(user, ccache)
    result = subprocess.run([sys.executable, "-c", _TOKEN_SCRIPT, f"HTTP@{PROXY_NAME}"], env=env,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


@pytest.fixture(scope="module")
def kerberos_node(module_node_factory, slapd, kdc):
    policy = directory_policy(slapd)
    policy["authentication"]["negotiate"] = True
    return module_node_factory.start(
        policy=policy, name="kerberos",
        args=["--keytab", str(kdc.keytab), "--service-principal", SERVICE_PRINCIPAL],
        env={"KRB5_CONFIG": str(kdc.krb5_conf), "KRB5RCACHEDIR": str(kdc.rcache)},
    )


def test_negotiate_is_offered_before_basic(kerberos_node, origins):
    response = proxy_request(kerberos_node, "GET", origins.url("/krb/challenge"))
    assert response.status == 407
    offered = [v for n, v in response.headers if n.lower() == "proxy-authenticate"]
    assert offered[0] == "Negotiate" and offered[1].startswith("Basic "), offered


def test_a_kerberos_ticket_names_the_user_and_their_directory_groups(kerberos_node, kdc, origins, tmp_path):
    token = spnego_token(kdc, "alice", tmp_path / "alice.ccache")
    echo = assert_passed(proxy_request(kerberos_node, "GET", origins.url("/krb/alice"),
                                       headers=[("Proxy-Authorization", f"Negotiate {token}")]))
    assert not harness.echo_headers(echo, "proxy-authorization")
    record = kerberos_node.wait_for_url("/krb/alice")
    assert record["user"] == "alice"
    assert record["groups"] == ["engineering"]
    # the group rule applies to the Kerberos user as to a Basic one
    token = spnego_token(kdc, "bob", tmp_path / "bob.ccache")
    assert_blocked(proxy_request(kerberos_node, "GET", origins.url("/engineering/krb"),
                                 headers=[("Proxy-Authorization", f"Negotiate {token}")]), "engineers-only")


def test_negotiate_authenticates_the_connection(kerberos_node, kdc, origins, tmp_path):
    token = spnego_token(kdc, "carol", tmp_path / "carol.ccache")
    with harness.RawConnection(kerberos_node.proxy) as conn:
        conn.send(harness.build_request("GET", origins.url("/krb/conn-1"),
                                        [("Proxy-Authorization", f"Negotiate {token}")]))
        assert conn.read_response().status == 200
        conn.send(harness.build_request("GET", origins.url("/krb/conn-2"), []))
        assert conn.read_response().status == 200
    assert kerberos_node.wait_for_url("/krb/conn-2")["user"] == "carol"


def test_a_replayed_or_forged_token_is_refused(kerberos_node, kdc, origins, tmp_path):
    token = spnego_token(kdc, "alice", tmp_path / "replay.ccache")
    first = proxy_request(kerberos_node, "GET", origins.url("/krb/replay-1"),
                          headers=[("Proxy-Authorization", f"Negotiate {token}")])
    assert first.status == 200
    replayed = proxy_request(kerberos_node, "GET", origins.url("/krb/replay-2"),
                             headers=[("Proxy-Authorization", f"Negotiate {token}")])
    assert replayed.status == 407
    forged = base64.b64encode(b"\x60\x82" + bytes(200)).decode()
    response = proxy_request(kerberos_node, "GET", origins.url("/krb/forged"),
                             headers=[("Proxy-Authorization", f"Negotiate {forged}")])
    assert response.status == 407


def test_basic_still_works_beside_negotiate(kerberos_node, origins):
    assert_passed(proxy_request(kerberos_node, "GET", origins.url("/krb/basic"),
                                headers=as_user("alice", "alice-password")))


def test_health_shows_the_directory(directory_node, origins):
    assert_passed(proxy_request(directory_node, "GET", origins.url("/dir/health"),
                                headers=as_user("alice", "alice-password")))
    def directory_reachable():
        _status, health = directory_node.health()
        return health if (health or {}).get("directory", {}).get("reachable") else None

    health = harness.wait_until(directory_reachable, timeout=10, what="the directory in /health")
    assert health["directory"]["urls"] and "bind_password" not in json.dumps(health)


def test_health_shows_the_directory_as_the_workers_use_it(node_factory, slapd, origins):
    # The workers authenticate the users; the node (which serves no traffic) adds their figures.
    node = node_factory.start(policy=directory_policy(slapd), args=["--workers", "2"], name="dirworkers")
    for i in range(10):
        assert_passed(proxy_request(node, "GET", origins.url(f"/dir/workers/{i}"),
                                    headers=as_user("alice", "alice-password")))

    def counted():
        _status, health = node.health()
        directory = (health or {}).get("directory") or {}
        return directory if directory.get("reachable") and directory.get("cached_users", 0) >= 1 else None

    directory = harness.wait_until(counted, timeout=10, what="the workers' directory figures in /health")
    assert directory["lookups"] >= 1 and directory["failures"] == 0


def test_curl_proxy_negotiate(kerberos_node, kdc, origins, tmp_path):
    # curl names the service after the proxy's host name: give that name the node's address.
    env = kdc.kinit("alice", tmp_path / "curl.ccache")
    host, port = kerberos_node.proxy
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}", "--proxy-negotiate", "-U", ":",
         "--resolve", f"{PROXY_NAME}:{port}:{host}", "-x", f"http://{PROXY_NAME}:{port}", origins.url("/krb/curl")],
        env=env, capture_output=True, timeout=30)
    assert result.stdout.decode() == "200", result.stderr.decode()
    assert kerberos_node.wait_for_url("/krb/curl")["user"] == "alice"


# --------------------------------------------------------------------------------------------
# Cluster: the directory settings (bind password included) reach slaves; the master shows them
# --------------------------------------------------------------------------------------------


def test_a_slave_authenticates_directory_users_and_the_master_sees_the_directory(cluster, slapd, origins):
    cluster.start_master(directory_policy(slapd))
    slave = cluster.add_slave()
    slave.wait_health(200, 15, check=lambda body: body.get("policy_version") == 1)
    response = harness.proxy_request(slave, "GET", origins.url("/cluster/dir"),
                                     headers=as_user("alice", "alice-password"))
    assert response.status == 200, response.text[:300]
    view = cluster.wait_view(slave.name, lambda entry: entry.get("directory") == "reachable", timeout=20,
                             what="the slave's directory state in the cluster view")
    assert "directory-admin-password" not in json.dumps(view)
    status, policy = cluster.api("GET", "/api/v1/policy")
    assert status == 200 and "directory-admin-password" not in json.dumps(policy)


def test_metrics_show_the_directory(directory_node, origins):
    import http.client

    assert_passed(proxy_request(directory_node, "GET", origins.url("/dir/metrics"),
                                headers=as_user("alice", "alice-password")))
    conn = http.client.HTTPConnection(*directory_node.portal, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert "safesquid_directory_reachable 1.0" in text
    assert "safesquid_directory_lookups_total" in text
