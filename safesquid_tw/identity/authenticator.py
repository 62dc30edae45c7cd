"""What one policy version knows about directory users: verdicts, groups, principals.

Built once per version from `authentication.directory` and the groups' `directory_groups`. The
directory connections and the remembered verdicts are carried over to the next version when the
directory settings did not change, so a policy update does not send every user back to the
directory at once; the mapping from directory groups to policy groups is always this version's.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from safesquid_tw.identity.errors import DirectoryUnavailable
from safesquid_tw.identity.verdicts import ExpiringVerdicts
from safesquid_tw.policy.model import MISS, Identity

_PROCESS_KEY = secrets.token_bytes(32)


def _key(kind: bytes, *parts: str) -> bytes:
    digest = hashlib.blake2b(key=_PROCESS_KEY, digest_size=32, person=b"dir-" + kind)
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)
    return digest.digest()


class DirectoryState:
    """The node's live view of one directory configuration: connections, verdicts, reachability."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, directory=None) -> None:
        # LDAP code loads only on nodes whose policy names a directory.
        from safesquid_tw.identity.ldapdir import LdapDirectory

        self.settings = settings
        self.directory = directory if directory is not None else LdapDirectory(settings)
        self.passwords = ExpiringVerdicts(clock, settings.cache_seconds)
        self.principals = ExpiringVerdicts(clock, settings.cache_seconds)
        self._wall = wall
        self.reachable: bool | None = None  # unknown until the first look-up
        self.last_error: str | None = None
        self.changed_at: float | None = None
        self.lookups = 0
        self.failures = 0

    def stats(self) -> dict[str, Any]:
        return {
            "urls": list(self.settings.urls),
            "reachable": self.reachable,
            "last_error": self.last_error,
            "since": self.changed_at,
            "lookups": self.lookups,
            "failures": self.failures,
            "cached_users": len(self.passwords) + len(self.principals),
        }

    def _note(self, ok: bool, error: str | None = None) -> None:
        self.lookups += 1
        if not ok:
            self.failures += 1
        if self.reachable is not ok:
            self.reachable = ok
            self.changed_at = self._wall()
        self.last_error = error if not ok else None

    def _call(self, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except DirectoryUnavailable as e:
            self._note(False, str(e))
            raise
        self._note(True)
        return result

    def verify(self, user: str, password: str):
        key = _key(b"basic", user, password)
        found = self.passwords.get(key)
        if found is not MISS:
            return found
        result = self._call(self.directory.authenticate, user, password)
        self.passwords.remember(key, result)
        return result

    def cached(self, user: str, password: str):
        return self.passwords.get(_key(b"basic", user, password))

    def probe(self) -> None:
        """Bind with the search account (blocking); notes reachability, raises when down."""
        self._call(self.directory.probe)

    def lookup_principal(self, user: str, principal: str):
        key = _key(b"principal", principal)
        found = self.principals.get(key)
        if found is not MISS:
            return found
        result = self._call(self.directory.find_user, user, principal=principal)
        self.principals.remember(key, result)
        return result

    def cached_principal(self, principal: str):
        return self.principals.get(_key(b"principal", principal))


class DirectoryAuthenticator:
    """Directory users for one policy version: their verdicts and the policy groups they get."""

    def __init__(self, state: DirectoryState, groups: Iterable[dict[str, Any]]) -> None:
        self.state = state
        # directory group DN or name (lower-cased) -> policy groups that name it
        self._group_map: dict[str, set[str]] = {}
        for group in groups:
            for name in group.get("directory_groups", ()):
                self._group_map.setdefault(name.strip().lower(), set()).add(group["name"])

    @classmethod
    def from_policy(cls, document: dict[str, Any]) -> "DirectoryAuthenticator | None":
        """None when the version has no directory. Nothing connects until the first look-up."""
        section = document["authentication"].get("directory")
        if not section:
            return None
        from safesquid_tw.identity.ldapdir import DirectorySettings

        return cls(DirectoryState(DirectorySettings.from_policy(section)), document.get("groups", ()))

    def adopt(self, previous: "DirectoryAuthenticator") -> None:
        """Keep the previous version's connections and verdicts when the settings are the same."""
        if previous.state.settings == self.state.settings:
            self.state = previous.state

    def identity(self, found) -> Identity | None:
        if found is None:
            return None
        return Identity(user=found.name, groups=self.policy_groups(found.groups),
                        directory_groups=found.groups)

    def policy_groups(self, directory_groups: frozenset[str]) -> frozenset[str]:
        out: set[str] = set()
        table = self._group_map
        if not table:
            return frozenset()
        for dn in directory_groups:
            hit = table.get(dn)
            if hit:
                out |= hit
            first = dn.split(",", 1)[0]
            hit = table.get(first.partition("=")[2] or first)
            if hit:
                out |= hit
        return frozenset(out)

    def cached(self, user: str, password: str):
        found = self.state.cached(user, password)
        if found is MISS:
            return MISS
        return self.identity(found)

    def verify(self, user: str, password: str) -> Identity | None:
        """Blocking (binds to the directory): call from a worker thread. Raises DirectoryUnavailable."""
        return self.identity(self.state.verify(user, password))

    def for_principal(self, user: str, principal: str) -> Identity | None:
        """Blocking: the directory entry of a Kerberos principal. Raises DirectoryUnavailable."""
        return self.identity(self.state.lookup_principal(user, principal))


__all__ = ["DirectoryAuthenticator", "DirectoryState", "DirectoryUnavailable"]
