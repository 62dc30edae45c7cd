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

from twisted.internet import defer

from safesquid_tw.policy.applier import PolicyApplier, PolicySuperseded
from safesquid_tw.policy.canonical_io import canonical_parts_reusing, digest_of_parts, parts_equal, record_parts
from safesquid_tw.policy.codec import canonical_bytes, digest, parse_json
from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import expect_int, expect_object, expect_str
from safesquid_tw.policy.hosts import domain_memo
from safesquid_tw.policy.incremental import SectionMemo
from safesquid_tw.policy.piecewise_json import parse_json_in_pieces
from safesquid_tw.policy.sectionchange import ChangeNotApplicable, SectionChange, rebuild_from_change, section_change
from safesquid_tw.policy.shadowing import policy_warnings
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
        self.current_from_cache = False  # the current version was read from the cache file at start
        self._clock = clock
        self._observers: list[Callable[[Policy], None]] = []
        # Where new versions are prepared: synchronous until the node hands in its thread pool.
        self.applier = PolicyApplier()
        # The canonical bytes of the current version when it was prepared here (the master
        # publishes them to its slaves without serialising the document again).
        self.current_bytes: bytes | None = None
        # Whether versions prepared here get their shadowed-rule warnings computed (in the
        # worker thread) for the log and the API. A slave runs what its master checked and
        # warned about already, so it skips them (about a tenth of a big version's CPU).
        self.shadow_warnings = True
        # Versions after the first reuse what did not change since the one before: validated
        # sections (by their input), canonical bytes (by section) and compiled pieces.
        self.sections = SectionMemo()
        self._kept_bytes: dict[str, tuple[Any, bytes]] = {}
        # On a master: the current version as the sections that changed since the one before
        # (policy/sectionchange.py), for slaves that run that one; None when too big or unknown.
        self.current_change: SectionChange | None = None

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
        self.current_bytes = None
        self.current_change = None
        self._swap(policy, source, from_cache=True)
        return policy

    def _parse_cache(self, data: bytes) -> tuple[Policy, str]:
        wrapper = expect_object(parse_json(data), "(cache)", _CACHE_FIELDS)
        version = expect_int(wrapper["version"], "(cache).version", minimum=1)
        stored_digest = expect_str(wrapper["digest"], "(cache).digest", max_len=100)
        source = expect_str(wrapper.get("source", "cache"), "(cache).source", max_len=1000)
        canonical = validate_document(wrapper["policy"], self.sections)
        actual = digest(canonical)
        if actual != stored_digest:
            raise PolicyError("(cache).digest", f"the document's digest is {actual}, not the recorded {stored_digest}")
        assert version is not None
        return Policy(version=version, digest=actual, document=canonical,
                      compiled=compile_policy(canonical, self._previous_compiled())), source

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
        canonical = validate_document(doc, self.sections)
        new_digest = digest(canonical)
        current = self.current
        if current is not None and current.digest == new_digest:
            return current
        version = current.version + 1 if current is not None else 1
        policy = Policy(version=version, digest=new_digest, document=canonical,
                        compiled=compile_policy(canonical, self._previous_compiled()))
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

    # -- changing the policy off the reactor thread ------------------------------------------

    def prepare_document(self, doc: object, *, source: str) -> "Prepared":
        """Worker thread: validate, compile and write the cache for `doc` as the next version.

        Reads `current` only; the swap is `commit_prepared`, on the reactor thread. Raises
        PolicyError (refused) or OSError (cache not written); nothing changes then.
        """
        with domain_memo():
            return self._prepare_document(doc, source=source)

    def _prepare_document(self, doc: object, *, source: str) -> "Prepared":
        if callable(doc):  # the document is read in the worker too (a policy file)
            doc = doc()
        canonical = validate_document(doc, self.sections)
        # Serialised once, in pieces (the GIL changes hands between them): digest, cache file,
        # history file and the master's publication all use these bytes.
        data, new_digest = self._canonical_bytes(canonical)
        current = self.current
        if current is not None and current.digest == new_digest:
            return Prepared(current, source, changed=False, base=current)
        version = current.version + 1 if current is not None else 1
        policy = Policy(version=version, digest=new_digest, document=canonical,
                        compiled=compile_policy(canonical, current.compiled if current is not None else None))
        if self.shadow_warnings:
            policy_warnings(policy)  # here, not in the swap's observers on the reactor thread
        self._write_cache(policy, source, data)
        change = section_change(current, policy, self._kept_bytes) if current is not None else None
        return Prepared(policy, source, changed=True, base=current, data=data, numbered_here=True, change=change)

    def prepare_blob(self, blob: bytes | Callable[[], bytes], version: int, *, source: str = "master") -> "Prepared":
        """Worker thread: parse, validate and compile a version numbered elsewhere (a slave taking
        its master's), and write the cache. Raises PolicyError or OSError; nothing changes then.

        `blob` may be a callable returning the bytes (called in the worker thread: reassembling
        and checking the chunks of a big policy is work too); what it raises fails the job."""
        with domain_memo():
            return self._prepare_blob(blob, version, source=source)

    def _prepare_blob(self, blob: bytes | Callable[[], bytes], version: int, *, source: str) -> "Prepared":
        if callable(blob):
            blob = blob()
        # Decoded a member at a time: the GIL changes hands between the pieces of 3 MB.
        canonical = validate_document(parse_json_in_pieces(blob), self.sections)
        data, new_digest = self._canonical_bytes(canonical, received=blob)
        current = self.current
        if current is not None and current.version == version and current.digest == new_digest:
            return Prepared(current, source, changed=False, base=current)
        policy = Policy(version=version, digest=new_digest, document=canonical,
                        compiled=compile_policy(canonical, current.compiled if current is not None else None))
        if self.shadow_warnings:
            policy_warnings(policy)  # here, not in the swap's observers on the reactor thread
        self._write_cache(policy, source, data)
        return Prepared(policy, source, changed=True, base=current, data=data)

    def _previous_compiled(self):
        return self.current.compiled if self.current is not None else None

    def _canonical_bytes(self, canonical: dict[str, Any], received: bytes | None = None) -> tuple[bytes, str]:
        """The document's canonical bytes and digest (policy thread); sections kept from the
        last version are not serialised again, and bytes `received` that are the canonical
        ones (a master's, the usual case) are used as they are instead of a copy."""
        parts, self._kept_bytes = canonical_parts_reusing(canonical, self._kept_bytes)
        new_digest = digest_of_parts(parts)
        if isinstance(received, bytes) and parts_equal(parts, received):
            return received, new_digest
        return b"".join(parts), new_digest

    def prepare_change(self, change: bytes, version: int, digest: str, *, source: str = "master") -> "Prepared":
        """Worker thread: a version numbered elsewhere, sent as the sections that changed since
        the current one (policy/sectionchange.py). Rebuilt, validated (unchanged sections taken
        as they are), checked against `digest`, compiled and cached like `prepare_blob`. Raises
        ChangeNotApplicable (fetch the whole version instead), PolicyError or OSError."""
        with domain_memo():
            current = self.current
            document = rebuild_from_change(change, current)
            canonical = validate_document(document, self.sections)
            parts, self._kept_bytes = canonical_parts_reusing(canonical, self._kept_bytes)
            new_digest = digest_of_parts(parts)
            if new_digest != digest:
                raise ChangeNotApplicable(f"the rebuilt document's digest is {new_digest}, not {digest}")
            assert current is not None
            policy = Policy(version=version, digest=new_digest, document=canonical,
                            compiled=compile_policy(canonical, current.compiled))
            if self.shadow_warnings:
                policy_warnings(policy)
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fields: dict[str, Any] = {"version": policy.version, "digest": policy.digest, "source": source}
            atomic_write(self.cache_path, record_parts(fields, "policy", parts), mode=0o600)
            return Prepared(policy, source, changed=True, base=current)

    def install_change_async(self, change: bytes, version: int, digest: str, *,
                             source: str = "master") -> defer.Deferred:
        return self.applier.submit(lambda: self.prepare_change(change, version, digest, source=source),
                                   self.commit_prepared)

    def commit_prepared(self, prepared: "Prepared") -> Policy:
        """Reactor thread: make a prepared version current (one assignment and the observers)."""
        if not prepared.changed:
            return prepared.policy
        if prepared.numbered_here and prepared.base is not self.current:
            # Another version was swapped in while this one was prepared (a synchronous apply):
            # its number is taken. Put the cache back to what runs and refuse this one.
            if self.current is not None:
                self._write_cache(self.current, self.current_source or "unknown")
            raise PolicySuperseded()
        replaced = self.current
        prepared.base = None  # the replaced version's last holders should be the swap and the worker
        if replaced is not None:
            prepared.policy.compiled.inherit_from(replaced.compiled)
        self.current_bytes = prepared.data
        self.current_change = prepared.change
        self._swap(prepared.policy, prepared.source)
        if replaced is not None:
            self.applier.retire(replaced)  # freed in pieces in the worker, not here at once
        return prepared.policy

    def apply_document_async(self, doc: object, *, source: str) -> defer.Deferred:
        """`apply_document` with the work off the reactor thread; fires with the Policy in force.

        `doc` may be a callable that returns the document (called in the worker thread)."""
        return self.applier.submit(lambda: self.prepare_document(doc, source=source), self.commit_prepared)

    def install_blob_async(self, blob: bytes | Callable[[], bytes], version: int, *,
                           source: str = "master") -> defer.Deferred:
        return self.applier.submit(lambda: self.prepare_blob(blob, version, source=source), self.commit_prepared)

    def _commit(self, policy: Policy, source: str) -> None:
        if self.current is not None:
            policy.compiled.inherit_from(self.current.compiled)
        self.current_bytes = self._write_cache(policy, source)
        self.current_change = None
        self._swap(policy, source)

    def _write_cache(self, policy: Policy, source: str, data: bytes | None = None) -> bytes:
        """Write the cache file; `data`: the document's canonical bytes when made already.
        Returns them."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if data is None:
            data = canonical_bytes(policy.document)
        fields: dict[str, Any] = {"version": policy.version, "digest": policy.digest, "source": source}
        atomic_write(self.cache_path, record_parts(fields, "policy", data), mode=0o600)
        return data

    def _swap(self, policy: Policy, source: str, *, from_cache: bool = False) -> None:
        self.current = policy
        self.current_source = source
        self.current_from_cache = from_cache
        for observer in list(self._observers):
            try:
                observer(policy)
            except Exception:
                # One broken observer must not keep the others from hearing of the new version.
                _log.failure("policy observer {observer!r} failed on version {version}",
                             observer=observer, version=policy.version)


class Prepared:
    """A version made ready in a worker thread, waiting for its swap."""

    __slots__ = ("policy", "source", "changed", "base", "data", "numbered_here", "change")

    def __init__(self, policy: Policy, source: str, *, changed: bool, base: Policy | None,
                 data: bytes | None = None, numbered_here: bool = False,
                 change: SectionChange | None = None) -> None:
        self.change = change  # the version as the sections changed since `base` (a master's)
        self.numbered_here = numbered_here  # its version number is the base's plus one
        self.policy = policy
        self.source = source
        self.changed = changed  # False: equal to the version that was current
        self.base = base  # the version current when it was prepared
        self.data = data  # canonical bytes of the document


__all__ = ["PolicyCacheCorrupt", "PolicyStore", "Prepared"]


def source_kind(source: str | None, *, from_cache: bool = False) -> str | None:
    """Who set the current version, as /health and the cluster view say it: "cache" (read at
    start), "master", "file" (a policy file), or "portal" (the portal, the API, a rollback)."""
    if source is None:
        return None
    if from_cache:
        return "cache"
    if source == "master":
        return "master"
    if source.startswith("file "):
        return "file"
    return "portal"
