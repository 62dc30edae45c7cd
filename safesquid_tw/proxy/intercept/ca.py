"""The inspection CA: created on a master's (or standalone node's) first start, replaceable by an
organisation's own CA, copied to slaves over the control plane.

Files under `<state-dir>/tls/`: `inspection-ca.crt` (PEM, 0644: clients install it) and
`inspection-ca.key` (PEM, 0600). The key never leaves this module except as a bundle for the
control plane; nothing here logs it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safesquid_tw.util.atomic import atomic_write

CERT_NAME = "inspection-ca.crt"
KEY_NAME = "inspection-ca.key"
CA_VALIDITY_DAYS = 3650
MAX_BUNDLE_BYTES = 64 * 1024


class CAError(ValueError):
    """A CA bundle that cannot be used, with the reason an administrator can act on."""


@attrs.frozen(eq=False)
class InspectionCA:
    """One CA: its certificate and key, parsed once; `fingerprint` names it in logs and pages."""

    cert: x509.Certificate = attrs.field(repr=False)
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = attrs.field(repr=False)
    cert_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), hex: what browsers show beside an installed CA."""
        return hashlib.sha256(self.cert_der).hexdigest()

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc


def create_ca(common_name: str, *, now: datetime.datetime | None = None) -> InspectionCA:
    """A new EC P-256 CA, valid ten years (backdated a day for clients with a slow clock)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "safesquid-tw"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "TLS inspection"),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return InspectionCA(cert, key, cert_pem, key_pem)


def parse_ca(cert_pem: bytes, key_pem: bytes, *, now: datetime.datetime | None = None) -> InspectionCA:
    """Check an administrator's (or the master's) CA bundle; CAError says what is wrong."""
    if len(cert_pem) > MAX_BUNDLE_BYTES or len(key_pem) > MAX_BUNDLE_BYTES:
        raise CAError("the certificate or key is larger than 64 KiB")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CAError("the certificate is not a PEM X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CAError("the key is protected by a passphrase: give it unencrypted (it is stored mode 0600)") from None
    except ValueError:
        raise CAError("the key is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CAError(f"an RSA key of {key.key_size} bits is too weak (2048 at least)")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size < 256:
            raise CAError(f"an EC key on {key.curve.name} is too weak (P-256 at least)")
    else:
        raise CAError("the key must be RSA (2048 bits or more) or EC (P-256 or stronger)")
    public_der = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # noqa: E731
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise CAError("the key does not belong to the certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError("the certificate is not a CA (no basicConstraints CA:TRUE)") from None
    if not constraints.ca:
        raise CAError("the certificate is not a CA (basicConstraints CA:FALSE)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise CAError(f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    # Keep the PEM canonical (one certificate, PKCS#8 key) whatever the administrator pasted.
    return InspectionCA(
        cert, key, cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


class CAStore:
    """The node's current inspection CA on disk and in memory, with observers told of a change."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "tls"
        self.current: InspectionCA | None = None
        self._observers: list[Callable[[InspectionCA], None]] = []

    def add_observer(self, observer: Callable[[InspectionCA], None]) -> None:
        self._observers.append(observer)

    def load(self) -> InspectionCA | None:
        """The CA on disk, or None when there is none yet; CAError for a damaged one."""
        cert_path, key_path = self.dir / CERT_NAME, self.dir / KEY_NAME
        if not cert_path.exists() or not key_path.exists():
            return None
        ca = parse_ca(cert_path.read_bytes(), key_path.read_bytes())
        self._set(ca)
        return ca

    def load_or_create(self, common_name: str) -> InspectionCA:
        ca = self.load()
        if ca is None:
            ca = create_ca(common_name)
            self._write(ca)
            self._set(ca)
        return ca

    def replace(self, ca: InspectionCA) -> None:
        """A new CA (from the portal, the API or the master): written, then in use at once."""
        if self.current is not None and self.current.fingerprint == ca.fingerprint:
            return
        self._write(ca)
        self._set(ca)

    def _write(self, ca: InspectionCA) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The key first: a crash between the two leaves a key without its certificate, which
        # load() refuses loudly, never a certificate signed by a key this node does not have.
        atomic_write(self.dir / KEY_NAME, ca.key_pem, mode=0o600)
        atomic_write(self.dir / CERT_NAME, ca.cert_pem, mode=0o644)

    def _set(self, ca: InspectionCA) -> None:
        self.current = ca
        for observer in list(self._observers):
            observer(ca)


__all__ = ["CAError", "CAStore", "InspectionCA", "create_ca", "parse_ca"]
