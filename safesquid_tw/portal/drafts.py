"""Per-administrator drafts of the policy: edits collect here until "Apply" makes them a version.

One file per account, `<state-dir>/portal/drafts/<account>.json`, holding the whole (valid)
document, the version it was started from and a list of what was changed. Every method does
file I/O: call them in a worker thread.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from safesquid_tw.portal.accounts import check_account_name
from safesquid_tw.util.atomic import atomic_write

FORMAT = "safesquid-portal-draft/1"
MAX_CHANGES = 200


@attrs.frozen
class Draft:
    base_version: int | None
    base_digest: str | None
    document: dict[str, Any]
    changes: tuple[str, ...]
    updated_at: float

    def with_change(self, document: dict[str, Any], change: str, now: float) -> "Draft":
        return attrs.evolve(self, document=document, changes=(*self.changes, change)[-MAX_CHANGES:], updated_at=now)


class DraftStore:
    def __init__(self, state_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(state_dir) / "portal" / "drafts"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock = clock

    def _path(self, account: str) -> Path:
        return self.directory / f"{check_account_name(account)}.json"

    def load(self, account: str) -> Draft | None:
        try:
            data = json.loads(self._path(account).read_bytes())
        except FileNotFoundError:
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        return Draft(
            base_version=data["base_version"], base_digest=data["base_digest"], document=data["document"],
            changes=tuple(data["changes"]), updated_at=data["updated_at"],
        )

    def start(self, base_version: int | None, base_digest: str | None, document: dict[str, Any]) -> Draft:
        return Draft(base_version, base_digest, document, (), self._clock())

    def save(self, account: str, draft: Draft) -> None:
        doc = {"format": FORMAT, **attrs.asdict(draft)}
        doc["changes"] = list(draft.changes)
        atomic_write(self._path(account), json.dumps(doc, sort_keys=True).encode("utf-8"), mode=0o600)

    def discard(self, account: str) -> bool:
        try:
            self._path(account).unlink()
        except FileNotFoundError:
            return False
        return True

    def now(self) -> float:
        return self._clock()


__all__ = ["Draft", "DraftStore"]
