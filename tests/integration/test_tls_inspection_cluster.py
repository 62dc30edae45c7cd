"""The inspection CA across a cluster: a slave intercepts with its master's CA, and a CA replaced
through the master's API reaches the slave and is used from its next tunnel, without a restart.
The key never shows up in the policy, the API, or a log."""

from __future__ import annotations

import ssl
import urllib.request

import pytest

import harness
from cluster_harness import cluster  # noqa: F401 - fixture
from tls_origins import OriginSet, https_via_proxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def origins():
    servers = OriginSet()
    yield servers
    servers.stop()


def _ca_of(host: str, port: int) -> bytes:
    return urllib.request.urlopen(f"http://{host}:{port}/inspection-ca.crt", timeout=5).read()


def _fetch_ok(slave, origins, cafile) -> bool:
    try:
        status, _h, _b, _der = https_via_proxy(slave.proxy, "localhost", origins.good.port, "/c", cafile=str(cafile))
    except (ssl.SSLError, OSError):
        return False
    return status == 200


def test_slave_intercepts_with_the_masters_ca_and_takes_a_replaced_one_without_restart(cluster, origins, tmp_path):
    policy = harness.make_policy(connect={"allowed_ports": [origins.good.port]}, tls_inspection={"enabled": True})
    cluster.start_master(policy)
    slave = cluster.add_slave(args=["--upstream-ca-file", str(origins.ca_file)])
    master_ca = _ca_of(cluster.master.host, cluster.master_port)
    first = tmp_path / "first-ca.pem"
    first.write_bytes(master_ca)
    harness.wait_until(lambda: _ca_of(slave.portal[0], slave.portal[1]) == master_ca, 10, "the slave to hold the master's CA")
    assert (slave.state_dir / "tls" / "inspection-ca.key").stat().st_mode & 0o777 == 0o600
    assert _fetch_ok(slave, origins, first)

    from safesquid_tw.proxy.intercept.ca import create_ca

    new_ca = create_ca("Example Corp inspection CA")
    status, body = cluster.api("PUT", "/api/v1/tls/ca", {"certificate": new_ca.cert_pem.decode(),
                                                         "key": new_ca.key_pem.decode()})
    assert status == 200, body
    assert body["fingerprint"] == new_ca.fingerprint and "key" not in body
    second = tmp_path / "second-ca.pem"
    second.write_bytes(new_ca.cert_pem)
    harness.wait_until(lambda: _fetch_ok(slave, origins, second), 10, "the slave to mint with the replaced CA")
    assert not _fetch_ok(slave, origins, first)

    # The key is nowhere it should not be.
    secret = new_ca.key_pem.decode().splitlines()[1]
    status, policy_body = cluster.api("GET", "/api/v1/policy")
    assert secret not in str(policy_body)
    status, ca_body = cluster.api("GET", "/api/v1/tls/ca")
    assert status == 200 and secret not in str(ca_body) and ca_body["fingerprint"] == new_ca.fingerprint
    for node in (cluster.master, slave):
        assert secret not in node.extended_text()
        assert "PRIVATE KEY" not in node.extended_text()
    audit = (cluster.master.state_dir / "logs" / "audit.log").read_text()
    assert "tls_ca_replace" in audit and new_ca.fingerprint in audit and secret not in audit


def test_a_bad_ca_is_refused_with_the_reason(cluster, origins):
    cluster.start_master(harness.make_policy())
    status, body = cluster.api("PUT", "/api/v1/tls/ca", {"certificate": "nope", "key": "nope"})
    assert status == 422 and "PEM" in body["message"]
