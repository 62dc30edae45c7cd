"""Origin TLS settings: the system trust store plus --upstream-ca-file, TLS 1.2 at least, and
certificate problems named the way a block page reader understands them."""

from __future__ import annotations

import glob

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from twisted.python.failure import Failure

from safesquid_tw.proxy.intercept.upstream_tls import UpstreamTLS, verify_error_text


def _verifies(tls: UpstreamTLS, pem: bytes) -> bool:
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, pem)
    try:
        crypto.X509StoreContext(tls._ctx.get_cert_store(), cert).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def test_system_roots_and_the_extra_ca_file_are_both_trusted(tmp_path):
    roots = sorted(glob.glob("/etc/ssl/certs/ISRG_Root_X1.pem"))
    if not roots:
        pytest.skip("no ISRG root in /etc/ssl/certs to check the system store with")
    ca = trustme.CA()
    ca_file = tmp_path / "extra.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("origin.test").cert_chain_pems[0].bytes()
    plain = UpstreamTLS()
    with_file = UpstreamTLS(str(ca_file))
    system_root = open(roots[0], "rb").read()
    assert _verifies(plain, system_root) and _verifies(with_file, system_root)
    assert not _verifies(plain, leaf)
    assert _verifies(with_file, leaf)


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Drive both ends over memory BIOs until both finish (or one raises)."""
    for _ in range(20):
        done = 0
        for conn in (client, server):
            try:
                conn.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def _server(max_version: int) -> SSL.Connection:
    ca = trustme.CA()
    cert = ca.issue_cert("origin.test")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_max_proto_version(max_version)
    ctx.set_alpn_select_callback(lambda conn, offered: offered[0])
    ctx.use_privatekey(serialization.load_pem_private_key(cert.private_key_pem.bytes(), None))
    ctx.use_certificate(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()))
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return conn


class _Proto:
    pass


def test_tls_12_at_least_and_http11_by_alpn():
    tls = UpstreamTLS()
    client = tls.creator_for("origin.test").clientConnectionForTLS(_Proto())
    client.set_connect_state()
    _handshake(client, _server(SSL.TLS1_2_VERSION))
    assert client.get_alpn_proto_negotiated() == b"http/1.1"
    old = tls.creator_for("origin.test").clientConnectionForTLS(_Proto())
    old.set_connect_state()
    with pytest.raises(SSL.Error):
        _handshake(old, _server(SSL.TLS1_1_VERSION))


@pytest.mark.parametrize("code, words", [
    (10, "expired"), (18, "self-signed"), (20, "unknown certificate authority"), (999, "error 999")])
def test_verify_errors_are_named(code, words):
    assert words in verify_error_text(code)


def test_handshake_failure_is_a_tls_protocol_error():
    failure = UpstreamTLS.handshake_failure(Failure(SSL.Error([("SSL routines", "", "unsupported protocol")])),
                                            "old.test", "192.0.2.1:443")
    assert failure.status == 502 and failure.error_type == "tls_protocol_error"
    assert "unsupported protocol" in failure.detail and 'details="unsupported protocol"' == failure.extra


class _Transport:
    """What `check` and `remember` read: the TLS connection (its app data: the TLS protocol)."""

    def __init__(self, conn: SSL.Connection, proto) -> None:
        self._conn = conn
        conn.set_app_data(proto)

    def getHandle(self) -> SSL.Connection:
        return self._conn


def _origin(ca: trustme.CA, name: str = "origin.test") -> SSL.Context:
    cert = ca.issue_cert(name)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_privatekey(serialization.load_pem_private_key(cert.private_key_pem.bytes(), None))
    ctx.use_certificate(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()))
    ctx.set_session_id(b"origin")
    return ctx


def _connect(tls: UpstreamTLS, origin: SSL.Context, host: str, port: int = 443):
    proto = _Proto()
    client = tls.connection_creator(host, port).clientConnectionForTLS(proto)
    client.set_connect_state()
    server = SSL.Connection(origin, None)
    server.set_accept_state()
    _handshake(client, server)
    # A TLS 1.3 ticket comes after the handshake: the first response brings it along.
    server.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.bio_write(server.bio_read(65536))
    assert client.recv(65536).startswith(b"HTTP/1.1 204")
    return _Transport(client, proto)


def test_a_verified_origins_session_is_resumed_for_the_same_host_and_port_only(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = UpstreamTLS(str(ca_file))
    origin = _origin(ca)
    first = _connect(tls, origin, "origin.test")
    assert not _lib.SSL_session_reused(first.getHandle()._ssl)
    assert tls.check(first, "origin.test", "192.0.2.1:443") == (None, False)
    tls.remember(first, "origin.test", 443)

    again = _connect(tls, origin, "origin.test")
    assert _lib.SSL_session_reused(again.getHandle()._ssl)
    assert tls.check(again, "origin.test", "192.0.2.1:443") == (None, False)  # the name still checked
    assert (tls.handshakes, tls.resumed) == (2, 1)  # what the metrics show: resumption hitting
    # Never offered to another port or another host name (which would also be another SNI).
    for host, port in (("origin.test", 8443), ("other.test", 443)):
        assert tls.connection_creator(host, port) is tls.creator_for(host)


def test_a_connection_with_certificate_problems_leaves_no_session(tmp_path):
    trusted, untrusted = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "ca.pem"
    trusted.cert_pem.write_to_path(str(ca_file))
    tls = UpstreamTLS(str(ca_file), tolerated=lambda host: True)
    bad = _connect(tls, _origin(untrusted), "origin.test")
    failure, tolerated = tls.check(bad, "origin.test", "192.0.2.1:443")
    assert failure is None and tolerated  # tolerated by the policy: still never resumed
    tls.remember(bad, "origin.test", 443)
    assert tls.connection_creator("origin.test", 443) is tls.creator_for("origin.test")


def test_a_name_that_fails_drops_the_hosts_sessions(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = UpstreamTLS(str(ca_file))
    good = _connect(tls, _origin(ca), "origin.test")
    tls.remember(good, "origin.test", 443)
    wrong = _connect(tls, _origin(ca, "elsewhere.test"), "origin.test", 8443)
    failure, _ = tls.check(wrong, "origin.test", "192.0.2.1:8443")
    assert failure is not None and "does not name origin.test" in failure.detail
    assert tls.connection_creator("origin.test", 443) is tls.creator_for("origin.test")
