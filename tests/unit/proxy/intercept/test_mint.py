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
