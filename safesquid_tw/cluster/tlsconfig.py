"""The master's TLS identity, the slaves' trust in it, and the channel binding of a connection.

The master keeps an EC P-256 key and a self-signed certificate in ``<state-dir>/tls/`` (key mode
0600, directory 0700), made on first start. The certificate names the host and every address
the master has (for browsers on the portal); when addresses change it is reissued with the
*same key*, so what slaves trust, the SHA-256 fingerprint of the master's public key (its SPKI),
survives. Compare it by hand with::

    openssl x509 -in master.crt -pubkey -noout | openssl pkey -pubin -outform der | sha256sum

A slave trusts either a fingerprint pinned by its operator or, failing that, the first master
that proved it knows the activation key (trust on first use, recorded in
``<state-dir>/tls/master-fingerprint``). A master presenting any other key is refused during the
TLS handshake, before a byte of the control plane flows, and the refusal is logged as critical.
Slaves insist on TLS 1.3 and on the control-plane ALPN protocol.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Callable, Iterable, Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from safesquid_tw.cluster.addresses import local_addresses
from safesquid_tw.cluster.fingerprints import format_fingerprint, parse_fingerprint, spki_fingerprint
from safesquid_tw.cluster.wire import ALPN_CONTROL_PLANE, ALPN_HTTP1
from safesquid_tw.util.atomic import atomic_write

_log = Logger()

TLS_DIR = "tls"
KEY_FILE = "master.key"
CERT_FILE = "master.crt"
FINGERPRINT_FILE = "master-fingerprint"
CERT_LIFETIME = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)
# RFC 9266: the TLS 1.3 exporter value meant for channel binding.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


class MasterIdentityMismatch(Exception):
    """The master presented a key other than the one this slave trusts."""


class ChannelBindingUnavailable(Exception):
    """The connection cannot carry a key proof (not TLS 1.3, or not the control-plane protocol)."""


# --- the master's identity --------------------------------------------------------------------


@attrs.frozen
class MasterIdentity:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def fingerprint(self) -> str:
        return spki_fingerprint(self.certificate)

    def server_options(
        self, protocols: Iterable[bytes] = (ALPN_CONTROL_PLANE, ALPN_HTTP1)
    ) -> CertificateOptions:
        """Server TLS options for the portal port; ALPN prefers the control plane."""
        return CertificateOptions(
            privateKey=self.key, certificate=self.certificate, acceptableProtocols=list(protocols)
        )


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _wanted_names(hostname: str, names: Iterable[str]) -> tuple[set[str], set[_IP]]:
    dns: set[str] = set()
    ips: set[_IP] = set()
    for item in [hostname, *names]:
        item = item.strip().strip("[]")
        if not item:
            continue
        try:
            ips.add(ipaddress.ip_address(item))
        except ValueError:
            if _DNS_NAME.fullmatch(item):
                dns.add(item.lower())
            else:
                _log.warn("leaving {name!r} out of the certificate: not an address or host name", name=item)
    return dns, ips


def _issue(
    key: ec.EllipticCurvePrivateKey, hostname: str, dns: set[str], ips: set[_IP], now: datetime.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, (hostname or "safesquid-tw master")[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "safesquid-tw master"),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in sorted(dns)]
    sans += [x509.IPAddress(ip) for ip in sorted(ips, key=lambda ip: (ip.version, ip))]
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clients whose clocks lag
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _needs_reissue(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    dns: set[str],
    ips: set[_IP],
    now: datetime.datetime,
) -> str | None:
    matches_key = cert.public_key() == key.public_key()
    if cert.issuer != cert.subject:
        # Placed there by the operator, issued by a CA: used as it is, never overwritten.
        if not matches_key:
            raise ValueError(f"the certificate issued by {cert.issuer.rfc4514_string()} is not for this key")
        return None
    if not matches_key:
        return "it does not match the key"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return "it expires soon"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it names no addresses"
    missing = dns - set(san.get_values_for_type(x509.DNSName))
    missing |= ips - set(san.get_values_for_type(x509.IPAddress))
    if missing:
        return f"it does not name {', '.join(sorted(map(str, missing)))}"
    return None


def load_or_create_master_identity(
    state_dir: str | os.PathLike[str],
    addresses: Iterable[str] = (),
    hostname: str | None = None,
    now: datetime.datetime | None = None,
    discover: Callable[[], Iterable[str]] = local_addresses,
    label: str = "master",
) -> MasterIdentity:
    """The master's key and certificate, made on first start; the certificate is reissued with
    the same key when it expires within 30 days or lacks an address or name it should carry.

    The certificate names `hostname` (default: this host's name), the addresses `discover`
    finds, and `addresses`: extra IP addresses or host names (say, the address slaves use
    through NAT). A key file that cannot be read is an error, never replaced: a new
    key would be refused by every slave.
    """
    tls_dir = Path(state_dir) / TLS_DIR
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tls_dir.stat().st_mode & 0o077:
        tls_dir.chmod(0o700)  # it holds the private key
    key_path, cert_path = tls_dir / KEY_FILE, tls_dir / CERT_FILE
    now = now or datetime.datetime.now(datetime.timezone.utc)
    hostname = socket.gethostname() if hostname is None else hostname
    dns, ips = _wanted_names(hostname, [*discover(), *addresses])

    if key_path.exists():
        if key_path.stat().st_mode & 0o077:
            _log.warn("{path} was readable by others; making it private (0600)", path=str(key_path))
            key_path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{key_path} is not a readable private key ({e}); restore it from a backup, or delete "
                "it to make a new identity (every slave must then be told the new fingerprint)"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} holds a {type(key).__name__}; the master's key must be an EC key")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(key_path, pem, mode=0o600)
        _log.info("made the {label}'s key {path}", label=label, path=str(key_path))

    cert = None
    why = "there is none"
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            why = "it cannot be read"
        else:
            try:
                why = _needs_reissue(cert, key, dns, ips, now)
            except ValueError as e:
                raise ValueError(f"{cert_path}: {e} ({key_path})") from None
    if why is not None:
        cert = _issue(key, hostname, dns, ips, now)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        _log.info("issued the {label}'s certificate {path} ({why})", label=label, path=str(cert_path), why=why)
    assert cert is not None
    identity = MasterIdentity(key, cert, key_path, cert_path)
    # `label` is "portal" on nodes that are not masters: they have no master key to speak of.
    _log.info("{label} identity: {fp}", label=label, fp=format_fingerprint(identity.fingerprint))
    return identity


# --- the slave's trust in its master ----------------------------------------------------------


@attrs.define
class MasterTrust:
    """Which master key a slave accepts: the pinned one, else the one recorded on first use."""

    store_path: Path
    pinned: str | None = None

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str], pinned: str | None = None) -> MasterTrust:
        store_path = Path(state_dir) / TLS_DIR / FINGERPRINT_FILE
        return cls(store_path, parse_fingerprint(pinned) if pinned else None)

    def recorded(self) -> str | None:
        try:
            text = self.store_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        try:
            return parse_fingerprint(text)
        except ValueError as e:
            raise MasterIdentityMismatch(
                f"{self.store_path} is damaged ({e}); delete it to trust the master anew"
            ) from None

    def check(self, fingerprint: str) -> Literal["pinned", "recorded", "first-use"]:
        """How `fingerprint` is trusted; raises `MasterIdentityMismatch` if it is not."""
        trusted, source = (self.pinned, "pinned") if self.pinned else (self.recorded(), "recorded")
        if trusted is None:
            return "first-use"
        if trusted == fingerprint:
            return source  # type: ignore[return-value]
        if source == "pinned":
            remedy = "if the master's key was replaced on purpose, update the pinned fingerprint"
        else:
            remedy = f"if the master's key was replaced on purpose, delete {self.store_path}"
        raise MasterIdentityMismatch(
            f"the master presented key {format_fingerprint(fingerprint)}, but this slave trusts "
            f"{format_fingerprint(trusted)} ({source}); refusing to connect: either someone is "
            f"impersonating the master or its key changed; {remedy} and restart"
        )

    def confirm(self, fingerprint: str) -> bool:
        """Record `fingerprint` if nothing is trusted yet. Call this only once the master has
        proved the activation key, so that a spoofed first contact cannot take the slot.
        Returns True if it was recorded now."""
        if self.check(fingerprint) != "first-use":
            return False
        self.store_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.store_path, (format_fingerprint(fingerprint) + "\n").encode("ascii"), mode=0o600)
        _log.info(
            "now trusting the master's key {fp} (recorded in {path})",
            fp=format_fingerprint(fingerprint),
            path=str(self.store_path),
        )
        return True


@implementer(IOpenSSLClientConnectionCreator)
class MasterClientCreator:
    """TLS client settings of a slave: TLS 1.3, the control-plane ALPN protocol, and the
    master's key checked against `MasterTrust` during the handshake."""

    def __init__(self, trust: MasterTrust, master_address: str = "") -> None:
        self.trust = trust
        self.master_address = master_address
        self.last_mismatch: MasterIdentityMismatch | None = None
        self._where = master_address or "the master"
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_alpn_protos([ALPN_CONTROL_PLANE])
        self._context = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def _verify(self, conn: SSL.Connection, cert: object, errno: int, depth: int, ok: int) -> bool:
        # Only the leaf matters: its key is what the slave trusts, whoever signed it. The
        # handshake itself proves the master holds that key.
        if depth != 0:
            return True
        try:
            fingerprint = spki_fingerprint(cert.to_cryptography())  # type: ignore[attr-defined]
            self.trust.check(fingerprint)
        except MasterIdentityMismatch as e:
            self.last_mismatch = e
            _log.critical("MASTER IDENTITY CHANGED at {address}: {why}", address=self._where, why=str(e))
            return False
        except Exception as e:  # an exception must not escape into OpenSSL's callback
            _log.critical("cannot check the certificate of {at}: {why}", at=self._where, why=repr(e))
            return False
        return True


# --- per-connection values --------------------------------------------------------------------


def _tls_connection(transport: object) -> SSL.Connection:
    handle = getattr(transport, "getHandle", None)
    conn = handle() if handle is not None else None
    if not isinstance(conn, SSL.Connection):
        raise ChannelBindingUnavailable("the connection is not TLS")
    return conn


def master_fingerprint(transport: object, role: Literal["master", "slave"]) -> str:
    """The SPKI fingerprint of the master's key as seen on this connection."""
    conn = _tls_connection(transport)
    if role == "master":
        cert = conn.get_certificate(as_cryptography=True)
    else:
        cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise ChannelBindingUnavailable("the master's certificate is not known on this connection")
    return spki_fingerprint(cert)


def channel_binding(transport: object, role: Literal["master", "slave"]) -> bytes:
    """64 bytes unique to this TLS connection and equal on both ends: the RFC 9266 exporter
    value followed by the SHA-256 of the master's public key. Requires TLS 1.3 and the
    control-plane ALPN protocol."""
    conn = _tls_connection(transport)
    if conn.get_protocol_version_name() != "TLSv1.3":
        version = conn.get_protocol_version_name()
        raise ChannelBindingUnavailable(f"the control plane needs TLS 1.3, not {version}")
    if conn.get_alpn_proto_negotiated() != ALPN_CONTROL_PLANE:
        raise ChannelBindingUnavailable(
            f"the peer did not agree on {ALPN_CONTROL_PLANE.decode()} "
            "(is it a safesquid-tw node of this release?)"
        )
    exporter = conn.export_keying_material(EXPORTER_LABEL, 32, b"")
    return exporter + bytes.fromhex(master_fingerprint(transport, role))


__all__ = [
    "ChannelBindingUnavailable",
    "MasterClientCreator",
    "MasterIdentity",
    "MasterIdentityMismatch",
    "MasterTrust",
    "channel_binding",
    "format_fingerprint",
    "load_or_create_master_identity",
    "local_addresses",
    "master_fingerprint",
    "parse_fingerprint",
    "spki_fingerprint",
]
