"""Every policy version the master has applied: who, when, why, and the document itself.

The current version lives in the PolicyStore (and its cache file); every version, the current one
included, is also kept as one file under `<state-dir>/policy/history/`, written durably before the
new version becomes current. A rollback is a new version whose document equals an old one.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import defer

from safesquid_tw.policy.canonical_io import record_bytes
from safesquid_tw.policy.codec import canonical_bytes, parse_json
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.secrets import redact
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.util.atomic import atomic_write


@attrs.frozen
class VersionInfo:
    version: int
    digest: str
    applied_by: str
    applied_at: float
    comment: str
    source: str

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class PolicyHistory:
    def __init__(self, store: PolicyStore, state_dir: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.directory = Path(state_dir) / "policy" / "history"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock = clock
        self._infos: dict[int, VersionInfo] = {}
        self.problems: list[str] = []
        self._scan()

    def _path(self, version: int) -> Path:
        return self.directory / f"{version:08d}.json"

    def _scan(self) -> None:
        for path in sorted(self.directory.glob("*.json")):
            try:
                wrapper = parse_json(path.read_bytes())
                info = VersionInfo(**{f.name: wrapper[f.name] for f in attrs.fields(VersionInfo)})
            except (OSError, PolicyError, KeyError, TypeError) as e:
                # Reported, set aside, never silently dropped.
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                self.problems.append(f"{path.name}: {e}; moved to {aside.name}")
                continue
            self._infos[info.version] = info

    def record_current(self, *, by: str, comment: str, source: str) -> VersionInfo | None:
        """Make sure the store's current version is in the history (e.g. the file loaded at start)."""
        policy = self.store.current
        if policy is None:
            return None
        info = self._infos.get(policy.version)
        if info is not None and info.digest == policy.digest:
            return info
        return self._write(policy, by=by, comment=comment, source=source)

    def apply(self, doc: object, *, by: str, comment: str, source: str = "portal") -> Policy:
        """Validate and apply `doc` as the next version (PolicyError: nothing changes)."""
        before = self.store.current
        policy = self.store.apply_document(doc, source=source)
        if before is None or policy.version != before.version:
            self._write(policy, by=by, comment=comment, source=source)
        return policy

    def apply_async(self, doc: object, *, by: str, comment: str, source: str = "portal") -> defer.Deferred:
        """`apply` with validation, compilation and both files written off the reactor thread
        (the store's applier); fires with the Policy in force, fails with PolicyError (nothing
        changed, the running version stays) or PolicySuperseded (a newer apply came first).

        `doc` may be a callable returning the document; it is called in the worker thread."""

        def work():
            prepared = self.store.prepare_document(doc, source=source)
            info = None
            if prepared.changed:
                info = self._write_file(prepared.policy, by=by, comment=comment, source=source, data=prepared.data)
            return prepared, info

        def commit(outcome):
            prepared, info = outcome
            policy = self.store.commit_prepared(prepared)
            if info is not None:
                self._infos[policy.version] = info
            return policy

        return self.store.applier.submit(work, commit)

    def rollback_async(self, version: int, *, by: str, comment: str = "") -> defer.Deferred:
        """`rollback` off the reactor thread; KeyError (as a failure) when there is no such version."""
        self.info(version)
        return self.apply_async(lambda: self.document(version), by=by,
                                comment=comment or f"roll back to version {version}", source=f"rollback {version}")

    def rollback(self, version: int, *, by: str, comment: str = "") -> Policy:
        doc = self.document(version)
        return self.apply(doc, by=by, comment=comment or f"roll back to version {version}", source=f"rollback {version}")

    def _write(self, policy: Policy, *, by: str, comment: str, source: str) -> VersionInfo:
        info = self._write_file(policy, by=by, comment=comment, source=source)
        self._infos[policy.version] = info
        return info

    def _write_file(self, policy: Policy, *, by: str, comment: str, source: str,
                    data: bytes | None = None) -> VersionInfo:
        """Write one version's file (any thread); the caller records the info. `data`: the
        document's canonical bytes when they are made already."""
        info = VersionInfo(
            version=policy.version, digest=policy.digest, applied_by=by, applied_at=self._clock(),
            comment=comment, source=source,
        )
        if data is None:
            data = canonical_bytes(policy.document)
        atomic_write(self._path(policy.version), record_bytes(info.as_json(), "policy", data), mode=0o600)
        return info

    def versions(self) -> list[VersionInfo]:
        """Newest first."""
        return [self._infos[v] for v in sorted(self._infos, reverse=True)]

    def info(self, version: int) -> VersionInfo:
        try:
            return self._infos[version]
        except KeyError:
            raise KeyError(f"there is no policy version {version}") from None

    def document(self, version: int) -> dict[str, Any]:
        self.info(version)
        wrapper = parse_json(self._path(version).read_bytes())
        return wrapper["policy"]

    def diff(self, old: int, new: int) -> str:
        """A readable unified diff of two versions' documents (pretty-printed JSON)."""
        before, after = self.document(old), self.document(new)
        # Secrets show as markers; one that differs between the two shows as "changed".
        a = json.dumps(redact(before), indent=2, sort_keys=True).splitlines()
        b = json.dumps(redact(after, before), indent=2, sort_keys=True).splitlines()
        return "\n".join(difflib.unified_diff(a, b, f"version {old}", f"version {new}", lineterm=""))
