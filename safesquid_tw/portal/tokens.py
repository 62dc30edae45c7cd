"""API tokens for `/api/v1/`: created and revoked in the portal, stored only as SHA-256 digests.

A token is shown once, when it is made; `<state-dir>/portal/tokens.json` keeps its digest, a
name, who made it and when. A token is 256 random bits, so a plain SHA-256 (not a slow hash)
is enough: there is nothing to guess by brute force. Looking a token up by its digest also keeps
the lookup's timing independent of the secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from safesquid_tw.util.atomic import atomic_write

FORMAT = "safesquid-portal-tokens/1"
PREFIX = "sstw_"
_TOKEN_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}\Z")


class TokenError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@attrs.frozen
class TokenInfo:
    id: str  # the first characters of the digest: names a token on pages and in the audit log
    name: str
    digest: str
    created_at: float
    created_by: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": self.created_at, "created_by": self.created_by}


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokenStore:
    def __init__(self, state_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / "portal" / "tokens.json"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock = clock
        self._by_digest: dict[str, TokenInfo] = {}
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = {"format": FORMAT, "tokens": []}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a {FORMAT} file")
        for item in data["tokens"]:
            info = TokenInfo(**item)
            self._by_digest[info.digest] = info

    def _write(self) -> None:
        doc = {"format": FORMAT, "tokens": [attrs.asdict(t) for t in self.tokens()]}
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)

    def tokens(self) -> list[TokenInfo]:
        return sorted(self._by_digest.values(), key=lambda t: (t.created_at, t.id))

    def create(self, name: str, *, by: str) -> tuple[TokenInfo, str]:
        """A new token: its record and the secret (shown once, never stored)."""
        name = name.strip()
        if not _TOKEN_NAME.match(name):
            raise TokenError("name", "give the token a name of 1 to 64 characters (what uses it?)")
        secret = PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(secret)
        info = TokenInfo(id=digest[:12], name=name, digest=digest, created_at=self._clock(), created_by=by)
        self._by_digest[digest] = info
        self._write()
        return info, secret

    def revoke(self, token_id: str) -> TokenInfo:
        for digest, info in self._by_digest.items():
            if info.id == token_id:
                del self._by_digest[digest]
                self._write()
                return info
        raise TokenError("id", f"there is no token {token_id!r}")

    def add_restored(self, info: TokenInfo) -> None:
        """A token from a backup (its digest only: the secret was never stored)."""
        self._by_digest[info.digest] = info
        self._write()

    def authenticate(self, secret: str) -> TokenInfo | None:
        if not secret.startswith(PREFIX) or len(secret) > 200:
            return None
        return self._by_digest.get(token_digest(secret))


__all__ = ["PREFIX", "TokenError", "TokenInfo", "TokenStore", "token_digest"]
