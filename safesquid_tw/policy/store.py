"""The node's current policy: one version at a time, cached on disk, swapped in one assignment.

The cache (`<state_dir>/policy/current.json`) holds the canonical document with its version,
digest and source, written atomically and durably before the swap, so a node that restarts
without its master serves the last policy it had. A cache that does not load is renamed aside
(never deleted, never half-used) and reported by raising `PolicyCacheCorrupt`; the caller logs
it and starts from another policy.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from safesquid_tw.policy.codec import canonical_bytes, digest, parse_json
from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import expect_int, expect_object, expect_str
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.util.atomic import atomic_write

_log = Logger()
_CACHE_FIELDS = {"version": True, "digest": True, "source": False, "policy": True}


class PolicyCacheCorrupt(Exception):
    """The cache file did not load; it has been renamed to `moved_to`."""

    def __init__(self, path: str, moved_to: str, reason: str) -> None:
        super().__init__(f"policy cache {path} is unusable ({reason}); moved aside to {moved_to}")
        self.path = path
        self.moved_to = moved_to
        self.reason = reason


class PolicyStore:
    def __init__(self, state_dir: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.directory = pathlib.Path(state_dir) / "policy"
        self.cache_path = self.directory / "current.json"
        self.current: Policy | None = None
        self.current_source: str | None = None
        self._clock = clock
        self._observers: list[Callable[[Policy], None]] = []

    def add_observer(self, fn: Callable[[Policy], None]) -> None:
        """Call `fn(policy)` after every swap (on the caller's thread)."""
        self._observers.append(fn)

    def remove_observer(self, fn: Callable[[Policy], None]) -> None:
        self._observers.remove(fn)

    # -- loading -----------------------------------------------------------------------------

    def load_cache(self) -> Policy | None:
        """Make the cached policy current and return it; None when there is no cache.

        Raises PolicyCacheCorrupt (after renaming the file aside) when the cache is unreadable
        as a policy; OSError when it cannot be read at all.
        """
        try:
            data = self.cache_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            policy, source = self._parse_cache(data)
        except PolicyError as e:
            moved_to = self._set_aside()
            raise PolicyCacheCorrupt(str(self.cache_path), moved_to, str(e)) from None
        self._swap(policy, source)
        return policy

    def _parse_cache(self, data: bytes) -> tuple[Policy, str]:
        wrapper = expect_object(parse_json(data), "(cache)", _CACHE_FIELDS)
        version = expect_int(wrapper["version"], "(cache).version", minimum=1)
        stored_digest = expect_str(wrapper["digest"], "(cache).digest", max_len=100)
        source = expect_str(wrapper.get("source", "cache"), "(cache).source", max_len=1000)
        canonical = validate_document(wrapper["policy"])
        actual = digest(canonical)
        if actual != stored_digest:
            raise PolicyError("(cache).digest", f"the document's digest is {actual}, not the recorded {stored_digest}")
        assert version is not None
        return Policy(version=version, digest=actual, document=canonical, compiled=compile_policy(canonical)), source

    def _set_aside(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = self.cache_path.with_name(f"{self.cache_path.name}.corrupt-{stamp}")
        counter = 1
        while target.exists():
            counter += 1
            target = self.cache_path.with_name(f"{self.cache_path.name}.corrupt-{stamp}-{counter}")
        os.replace(self.cache_path, target)
        return str(target)

    # -- changing the policy -----------------------------------------------------------------

    def apply_document(self, doc: object, *, source: str) -> Policy:
        """Validate, compile and make `doc` current as the next version.

        A document equal (by digest) to the current one changes nothing and returns the current
        version. On PolicyError (or an OSError writing the cache) nothing changes.
        """
        canonical = validate_document(doc)
        new_digest = digest(canonical)
        current = self.current
        if current is not None and current.digest == new_digest:
            return current
        version = current.version + 1 if current is not None else 1
        policy = Policy(version=version, digest=new_digest, document=canonical, compiled=compile_policy(canonical))
        self._commit(policy, source)
        return policy

    def install(self, policy: Policy, *, source: str = "master") -> None:
        """Take a version numbered elsewhere (a slave taking its master's) as it is.

        Raises PolicyError when the policy's digest does not match its document.
        """
        actual = digest(policy.document)
        if actual != policy.digest:
            raise PolicyError("(document)", f"digest {actual} does not match the announced {policy.digest}")
        current = self.current
        if current is not None and current.version == policy.version and current.digest == policy.digest:
            return
        self._commit(policy, source)

    def _commit(self, policy: Policy, source: str) -> None:
        if self.current is not None:
            policy.compiled.inherit_from(self.current.compiled)
        self._write_cache(policy, source)
        self._swap(policy, source)

    def _write_cache(self, policy: Policy, source: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        record: dict[str, Any] = {
            "version": policy.version,
            "digest": policy.digest,
            "source": source,
            "policy": policy.document,
        }
        atomic_write(self.cache_path, canonical_bytes(record), mode=0o600)

    def _swap(self, policy: Policy, source: str) -> None:
        self.current = policy
        self.current_source = source
        for observer in list(self._observers):
            try:
                observer(policy)
            except Exception:
                # One broken observer must not keep the others from hearing of the new version.
                _log.failure("policy observer {observer!r} failed on version {version}",
                             observer=observer, version=policy.version)


__all__ = ["PolicyCacheCorrupt", "PolicyStore"]
