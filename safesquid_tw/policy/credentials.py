"""Proxy users' passwords: slow argon2id verification, remembered per policy version.

A password hash is memory-hard on purpose (tens of milliseconds), too slow to run for every
request of a browser that sends `Proxy-Authorization` each time. So each version keeps a
keyed BLAKE2b digest of the (user, password) pairs it has verified, keyed with a random key made
once per process: the cache never holds a password, and its entries mean nothing to anyone
who reads memory dumps from another process.

Failures are remembered too. Within one version a wrong password stays wrong, so repeating
the same wrong pair cannot make the proxy burn argon2 time again; and a failure is a separate
table, so it can never be mistaken for a success. Guessing *different* passwords still costs a
full verification each; throttling those is the front door's business.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from typing import Any

import argon2

from safesquid_tw.policy.model import MISS, CachedIdentity, Identity

_PROCESS_KEY = secrets.token_bytes(32)
_CACHE_LIMIT = 10000
# verify() reads the cost parameters from each hash, so one hasher serves every user.
_VERIFIER = argon2.PasswordHasher()


@functools.cache
def _decoy_hash() -> str:
    # Unknown users are checked against this, so a wrong user name takes as long as a wrong
    # password and timing does not tell which names exist.
    from safesquid_tw.policy.hashpw import make_hasher

    return make_hasher().hash(secrets.token_urlsafe(16))


def credential_key(user: str, password: str) -> bytes:
    user_bytes = user.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key=_PROCESS_KEY, digest_size=32, person=b"proxy-basic")
    digest.update(len(user_bytes).to_bytes(4, "big"))
    digest.update(user_bytes)
    digest.update(password.encode("utf-8", "surrogatepass"))
    return digest.digest()


class Credentials:
    """The users of one policy version and what has been verified against them."""

    def __init__(self, users: list[dict[str, Any]]) -> None:
        self._hashes: dict[str, str] = {u["name"]: u["password_hash"] for u in users}
        self._identities: dict[str, Identity] = {
            u["name"]: Identity(user=u["name"], groups=frozenset(u["groups"])) for u in users
        }
        self._good: dict[bytes, Identity] = {}
        self._bad: dict[bytes, str] = {}  # key -> user name
        self._lock = threading.Lock()

    def identity(self, user: str) -> Identity | None:
        return self._identities.get(user)

    def cached(self, user: str, password: str) -> CachedIdentity:
        key = credential_key(user, password)
        identity = self._good.get(key)
        if identity is not None:
            return identity
        if key in self._bad:
            return None
        return MISS

    def verify(self, user: str, password: str) -> Identity | None:
        """Check a password the slow way (call it from a thread) and remember the outcome."""
        key = credential_key(user, password)
        identity = self._good.get(key)
        if identity is not None:
            return identity
        if key in self._bad:
            return None
        stored = self._hashes.get(user)
        try:
            ok = _VERIFIER.verify(stored or _decoy_hash(), password) and stored is not None
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, UnicodeError):
            ok = False
        with self._lock:
            if ok:
                identity = self._identities[user]
                _remember(self._good, key, identity)
                return identity
            _remember(self._bad, key, user)
            return None

    def inherit(self, previous: Credentials) -> None:
        """Keep verdicts from the previous version for users whose password hash is unchanged.

        Without this every user would pay a full verification after each policy update, all
        at once. Group changes still apply: the remembered identity is this version's.
        """
        with previous._lock:
            good = list(previous._good.items())
            bad = list(previous._bad.items())
        with self._lock:
            for key, old_identity in good:
                name = old_identity.user
                if name in self._hashes and self._hashes[name] == previous._hashes.get(name):
                    _remember(self._good, key, self._identities[name])
            for key, name in bad:
                if self._hashes.get(name) == previous._hashes.get(name):
                    _remember(self._bad, key, name)


def _remember(table: dict[bytes, Any], key: bytes, value: Any) -> None:
    if len(table) >= _CACHE_LIMIT:
        # Drop the oldest entry (dicts keep insertion order).
        del table[next(iter(table))]
    table[key] = value


__all__ = ["Credentials", "credential_key"]
