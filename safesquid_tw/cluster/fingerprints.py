"""The text forms of a master key's fingerprint: the SHA-256 of its public key (SPKI, DER).

`spki_fingerprint` computes it as 64 lowercase hex digits, the form compared in code;
`format_fingerprint` writes it as operators see it (``SHA256:AB:CD:...``) and `parse_fingerprint`
reads it back however it was pasted.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def spki_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's public key (SubjectPublicKeyInfo, DER), 64 lowercase hex digits."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def format_fingerprint(fingerprint: str) -> str:
    """``SHA256:AB:CD:...``, the form shown to operators and written to the trust file."""
    return "SHA256:" + ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()


def parse_fingerprint(text: str) -> str:
    """Accept a fingerprint as operators paste it (colons, spaces, any case, ``SHA256:`` prefix)."""
    cleaned = text.strip()
    if cleaned.lower().startswith("sha256:"):
        cleaned = cleaned[7:]
    cleaned = "".join(cleaned.split()).replace(":", "").lower()
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(
            f"{text.strip()[:120]!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
        )
    return cleaned


__all__ = [
    "format_fingerprint",
    "parse_fingerprint",
    "spki_fingerprint",
]
