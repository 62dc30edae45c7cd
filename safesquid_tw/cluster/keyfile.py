"""The activation key file: its minimum length, and the one a master makes when it has none.

The key is the cluster's only shared secret (every proof on the control plane derives from it),
so a short one is refused at start. A master started without a key file writes a fresh random
key (mode 0600) and says where, so that the operator can copy it to the slaves.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from twisted.logger import Logger

from safesquid_tw.util.atomic import atomic_write

log = Logger()

MIN_KEY_LENGTH = 16


def check_key_length(key: str, path: str) -> str:
    """`key` itself, or ValueError saying it is too short (the message never shows the key)."""
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(
            f"the activation key in {path} is {len(key)} characters long; at least {MIN_KEY_LENGTH} "
            "are needed (make one with e.g. `openssl rand -base64 32`)"
        )
    return key


def ensure_master_key(path: str | os.PathLike[str]) -> bool:
    """Create `path` with a new random key unless it exists; True if it was created."""
    target = Path(path)
    if target.exists():
        return False
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(str(target), (secrets.token_urlsafe(32) + "\n").encode("ascii"), mode=0o600)
    log.warn(
        "no activation key file: a new key was written to {path} (mode 0600); copy it to every slave "
        "(--activation-key-file)",
        path=str(target.resolve()),
    )
    return True


__all__ = ["MIN_KEY_LENGTH", "check_key_length", "ensure_master_key"]
