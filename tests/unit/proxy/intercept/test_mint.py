"""The inspection CA and the leaves minted from it: what clients check, caching, CA changes."""

from __future__ import annotations

import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from safesquid_tw.proxy.intercept.ca import CAError, CAStore, create_ca, parse_ca
from safesquid_tw.proxy.intercept.mint import LeafCache, mint_leaf

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return create_ca("Test inspection CA", now=NOW)


@pytest.fixture(scope="module")
def leaf_key():
    return ec.generate_private_key(ec.SECP256R1())


def test_ca_is_an_ec_p256_ca_valid_for_years(ca):
    cert = ca.cert
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - NOW > datetime.timedelta(days=3000)


def test_leaf_has_what_clients_check(ca, leaf_key):
    leaf = mint_leaf(ca, leaf_key, "www.example.com", now=NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com"]
    assert leaf.issuer == ca.cert.subject
    assert leaf.not_valid_before_utc <= NOW - datetime.timedelta(days=1)  # backdated for skewed clocks
    assert leaf.not_valid_after_utc - NOW <= datetime.timedelta(days=397)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest
    ca.key.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_ip_literal_gets_an_ip_san(ca, leaf_key):
    leaf = mint_leaf(ca, leaf_key, "192.0.2.7", now=NOW)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]


def test_a_leaf_never_outlives_its_ca(leaf_key):
    short = create_ca("short", now=NOW - datetime.timedelta(days=3649))
    leaf = mint_leaf(short, leaf_key, "a.example", now=NOW)
    assert leaf.not_valid_after_utc <= short.not_after


def test_parse_ca_refuses_what_cannot_serve(ca):
    with pytest.raises(CAError, match="PEM X.509"):
        parse_ca(b"junk", ca.key_pem)
    other = create_ca("other")
    with pytest.raises(CAError, match="does not belong"):
        parse_ca(ca.cert_pem, other.key_pem)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_pem = weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    with pytest.raises(CAError, match="too weak"):
        parse_ca(ca.cert_pem, weak_pem)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = mint_leaf(ca, leaf_key, "not-a-ca.example")
    leaf_key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
    with pytest.raises(CAError, match="not a CA"):
        parse_ca(leaf.public_bytes(serialization.Encoding.PEM), leaf_key_pem)
    assert parse_ca(ca.cert_pem, ca.key_pem).fingerprint == ca.fingerprint


def test_store_creates_once_with_a_private_key_and_tells_observers(tmp_path, ca):
    store = CAStore(tmp_path)
    seen = []
    store.add_observer(seen.append)
    first = store.load_or_create("node CA")
    assert os.stat(tmp_path / "tls" / "inspection-ca.key").st_mode & 0o777 == 0o600
    assert CAStore(tmp_path).load_or_create("node CA").fingerprint == first.fingerprint
    store.replace(ca)
    assert [c.fingerprint for c in seen] == [first.fingerprint, ca.fingerprint]
    assert CAStore(tmp_path).load().fingerprint == ca.fingerprint


class _SyncPool:
    """Runs 'thread' work at once: the cache's bookkeeping is what is tested here."""

    def __init__(self) -> None:
        self.jobs = []

    def callInThreadWithCallback(self, on_result, fn, *args, **kwargs):
        self.jobs.append((on_result, fn, args, kwargs))

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, fn, args, kwargs in jobs:
            try:
                on_result(True, fn(*args, **kwargs))
            except Exception as e:  # pragma: no cover
                from twisted.python.failure import Failure

                on_result(False, Failure(e))


class _Reactor:
    def callFromThread(self, fn, *args, **kwargs):
        fn(*args, **kwargs)


def test_cache_mints_once_per_host_shares_the_job_and_is_cleared_by_a_new_ca(ca):
    pool = _SyncPool()
    cache = LeafCache(_Reactor(), pool, size=2)
    cache.set_ca(ca)
    results = []
    cache.context_for("a.example").addCallback(results.append)
    cache.context_for("a.example").addCallback(results.append)
    assert len(pool.jobs) == 1 and results == []  # one job for both, nothing on the caller's thread
    pool.run_all()
    assert len(results) == 2 and results[0] is results[1]
    assert cache.cached("a.example") is results[0]
    for host in ("b.example", "c.example"):
        cache.context_for(host)
        pool.run_all()
    assert cache.cached("a.example") is None and len(cache) == 2  # LRU bound
    cache.set_ca(create_ca("replacement"))
    assert len(cache) == 0


def test_a_leaf_minted_for_an_old_ca_is_not_cached(ca):
    pool = _SyncPool()
    cache = LeafCache(_Reactor(), pool)
    cache.set_ca(ca)
    cache.context_for("a.example")
    cache.set_ca(create_ca("replacement"))  # while the job runs
    pool.run_all()
    assert cache.cached("a.example") is None


def test_cached_leaf_is_renewed_near_expiry(ca):
    now = [NOW]
    pool = _SyncPool()
    cache = LeafCache(_Reactor(), pool, clock=lambda: now[0])
    cache.set_ca(ca)
    cache.context_for("a.example")
    pool.run_all()
    assert cache.cached("a.example") is not None
    now[0] = NOW + datetime.timedelta(days=396)
    assert cache.cached("a.example") is None


# -- the server context's choices: what a client gets, and resumption kept -------------------

def _handshake(server_ctx, client_ctx, session=None):
    """A pyOpenSSL client and server over memory BIOs; returns (client, server) once done."""
    from OpenSSL import SSL

    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"shop.example")
    if session is not None:
        client.set_session(session)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    for _ in range(10):
        for me, peer in ((client, server), (server, client)):
            try:
                me.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                peer.bio_write(me.bio_read(65536))
            except SSL.WantReadError:
                pass
    try:  # TLS 1.3 tickets arrive after the handshake: let the client read them
        client.recv(1)
    except SSL.WantReadError:
        pass
    return client, server


def _client_context(ca, *, max_version=None, tls13_suites=None):
    from OpenSSL import SSL
    from OpenSSL.crypto import X509

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.get_cert_store().add_cert(X509.from_cryptography(ca.cert))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if tls13_suites is not None:
        ctx.set_tls13_ciphersuites(tls13_suites)
    return ctx


@pytest.fixture(scope="module")
def shop_context(ca, leaf_key):
    from safesquid_tw.proxy.intercept.mint import server_context

    return server_context(ca, leaf_key, mint_leaf(ca, leaf_key, "shop.example", now=NOW))


def test_tls13_clients_get_aes128_gcm(ca, shop_context):
    client, _server = _handshake(shop_context, _client_context(ca))
    assert client.get_protocol_version_name() == "TLSv1.3"
    assert client.get_cipher_name() == "TLS_AES_128_GCM_SHA256"


def test_a_client_that_prefers_chacha20_gets_it(ca, shop_context):
    ctx = _client_context(ca, tls13_suites=b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256")
    client, _server = _handshake(shop_context, ctx)
    assert client.get_cipher_name() == "TLS_CHACHA20_POLY1305_SHA256"


def test_tls12_clients_get_ecdhe_ecdsa_aes128_gcm(ca, shop_context):
    from OpenSSL import SSL

    client, _server = _handshake(shop_context, _client_context(ca, max_version=SSL.TLS1_2_VERSION))
    assert client.get_protocol_version_name() == "TLSv1.2"
    assert client.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest.mark.parametrize("tls12", [False, True])
def test_clients_resume_their_session(ca, shop_context, tls12):
    from OpenSSL import SSL

    ctx = _client_context(ca, max_version=SSL.TLS1_2_VERSION if tls12 else None)
    first, _ = _handshake(shop_context, ctx)
    from OpenSSL._util import lib

    assert not lib.SSL_session_reused(first._ssl)
    again, server = _handshake(shop_context, ctx, session=first.get_session())
    assert lib.SSL_session_reused(again._ssl) and lib.SSL_session_reused(server._ssl)
