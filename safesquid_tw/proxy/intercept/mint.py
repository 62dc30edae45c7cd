"""Leaf certificates for intercepted hosts, minted off the reactor thread and cached.

One EC P-256 key serves every leaf (a handshake then costs one ECDSA signature, and no key is
ever generated per host). A leaf is minted once per host in a worker thread, kept in a bounded
LRU with its ready-made `SSL.Context` (session cache included) until a day before it expires,
and everything is dropped when the CA changes. Concurrent requests for the same host share one
minting job, so a burst of new hosts costs the thread pool, never the reactor.

The certificate follows what clients check (mitmproxy's certs.py): the host in subjectAltName
(an IP SAN for an IP literal), a not-before backdated two days for skewed clocks, a validity of
at most 397 days (Apple's limit), digitalSignature key usage, serverAuth EKU, and the
authority/subject key identifiers that chain building uses.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections import OrderedDict
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, threads

from safesquid_tw.proxy.intercept.ca import InspectionCA

LEAF_DAYS = 397
BACKDATE = datetime.timedelta(days=2)
RENEW_BEFORE = datetime.timedelta(days=1)
CACHE_SIZE = 4096
ALPN_HTTP11 = b"http/1.1"


def mint_leaf(ca: InspectionCA, leaf_key: ec.EllipticCurvePrivateKey, host: str,
              *, extra_names: tuple[str, ...] = (), now: datetime.datetime | None = None) -> x509.Certificate:
    """A leaf for `host` (a DNS name or an IP literal) signed by the CA. Pure and thread-safe."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = []
    for name in (host, *extra_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    not_after = min(now + datetime.timedelta(days=LEAF_DAYS), ca.not_after)
    # The CN is ignored by modern clients but still shown by them; 64 characters at most.
    cn = host if len(host) <= 64 else host[:64]
    public = leaf_key.public_key()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "safesquid-tw inspection")]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    return builder.sign(ca.key, hashes.SHA256())


def _select_http11(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # Only HTTP/1.1 is read inside the tunnel: a client offering h2 alone gets no ALPN answer
    # and falls back to (or fails without) HTTP/1.1, never an h2 stream we cannot parse.
    return ALPN_HTTP11 if ALPN_HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


# SSL_OP_PRIORITIZE_CHACHA (OpenSSL 1.1.1 and later; pyOpenSSL has no name for it): with the
# server's preference, a client that lists ChaCha20 first gets it.
OP_PRIORITIZE_CHACHA = 1 << 21
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
# The leaf key is EC: only ECDSA suites can be used with TLS 1.2, forward-secret AEADs only.
TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
                 b"ECDHE-ECDSA-AES256-GCM-SHA384")


def server_context(ca: InspectionCA, leaf_key: ec.EllipticCurvePrivateKey, leaf: x509.Certificate) -> SSL.Context:
    """The server-side context for one host: TLS 1.2+, the leaf and the CA as its chain."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
                    | OP_PRIORITIZE_CHACHA)
    # AES-128-GCM first: OpenSSL's own order puts AES-256-GCM-SHA384 first, and its SHA-384
    # transcript and key schedule cost about 8 % more per handshake here, for no protection a
    # web client needs. ChaCha20 still wins for a client that asks for it first (no AES in
    # hardware: phones), as Mozilla's recommended configurations do.
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.use_privatekey(leaf_key)
    ctx.use_certificate(leaf)
    ctx.add_extra_chain_cert(ca.cert)
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_select_http11)
    # Resumed sessions skip the signature: browsers reconnect to the same host all the time.
    ctx.set_session_id(b"safesquid-tw")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    return ctx


class LeafCache:
    """host -> (SSL.Context, renew after), minted in `pool` threads, LRU-bounded."""

    def __init__(self, reactor, pool, *, size: int = CACHE_SIZE,
                 clock: Callable[[], datetime.datetime] | None = None) -> None:
        self.reactor = reactor
        self.pool = pool
        self.size = size
        self._now = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.ca: InspectionCA | None = None
        self._cache: OrderedDict[str, tuple[SSL.Context, datetime.datetime]] = OrderedDict()
        self._pending: dict[str, list[defer.Deferred]] = {}
        self._generation = 0
        self.minted = 0

    def set_ca(self, ca: InspectionCA) -> None:
        """A new CA: every cached leaf was signed by the old one and goes."""
        self.ca = ca
        self._generation += 1
        self._cache.clear()

    def cached(self, host: str) -> SSL.Context | None:
        found = self._cache.get(host)
        if found is None:
            return None
        ctx, renew_after = found
        if self._now() >= renew_after:
            del self._cache[host]
            return None
        self._cache.move_to_end(host)
        return ctx

    def context_for(self, host: str) -> defer.Deferred:
        """Fires with the SSL.Context for host: at once from the cache, else after minting."""
        ctx = self.cached(host)
        if ctx is not None:
            return defer.succeed(ctx)
        if self.ca is None:
            return defer.fail(RuntimeError("no inspection CA"))
        d: defer.Deferred = defer.Deferred()
        waiting = self._pending.get(host)
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[host] = [d]
        ca, generation = self.ca, self._generation
        job = threads.deferToThreadPool(self.reactor, self.pool, self._mint, ca, host)
        job.addBoth(self._minted, host, generation)
        return d

    def _mint(self, ca: InspectionCA, host: str) -> tuple[SSL.Context, datetime.datetime]:
        leaf = mint_leaf(ca, self.leaf_key, host, now=self._now())
        return server_context(ca, self.leaf_key, leaf), leaf.not_valid_after_utc - RENEW_BEFORE

    def _minted(self, result, host: str, generation: int) -> None:
        waiting = self._pending.pop(host, [])
        if isinstance(result, tuple):
            ctx, renew_after = result
            self.minted += 1
            if generation == self._generation:
                self._cache[host] = (ctx, renew_after)
                self._cache.move_to_end(host)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            for d in waiting:
                d.callback(ctx)
        else:
            for d in waiting:
                d.errback(result)

    def __len__(self) -> int:
        return len(self._cache)


__all__ = ["LeafCache", "mint_leaf", "server_context"]
