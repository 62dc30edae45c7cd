"""The portal's administrator accounts: `<state-dir>/portal/accounts.json`, argon2id hashes only.

On first start there is no account at all; `ensure_initial_admin` then creates `admin` with a
random password, writes that password once to `<state-dir>/admin-password` (mode 0600) and
returns the path, so the caller can log where it is (never the password itself).

Hashing and verifying cost tens of milliseconds and 64 MiB each on purpose: call `verify`,
`add` and `set_password` in a worker thread, never on the reactor thread. The file is small and
written atomically; a lock keeps a thread's write from interleaving with another's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import argon2
import attrs

from safesquid_tw.util.atomic import atomic_write

FORMAT = "safesquid-portal-accounts/1"
INITIAL_ADMIN = "admin"
PASSWORD_FILE = "admin-password"
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
# Account names become draft file names: keep them to a small, unambiguous alphabet.
_ACCOUNT_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}\Z")


class AccountError(ValueError):
    """A refused account change; `field` names the form field it is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@attrs.frozen
class Account:
    name: str
    password_hash: str | None  # None: restored from a backup, no password set yet
    created_at: float
    created_by: str
    password_changed_at: float | None = None

    def public(self) -> dict[str, Any]:
        """What a backup and the accounts page may show: everything but the hash."""
        return {
            "name": self.name,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "password_changed_at": self.password_changed_at,
            "has_password": self.password_hash is not None,
        }


def make_admin_hasher() -> argon2.PasswordHasher:
    """argon2id with argon2-cffi's defaults (RFC 9106's low-memory profile: 64 MiB, 3 passes)."""
    return argon2.PasswordHasher(type=argon2.Type.ID)


def check_account_name(name: str) -> str:
    if not _ACCOUNT_NAME.match(name):
        raise AccountError(
            "name", "an account name is 1 to 32 lower-case letters, digits, '.', '_' or '-', starting with a letter"
        )
    return name


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError("password", f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError("password", f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    return password


class AccountStore:
    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        hasher: argon2.PasswordHasher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "portal" / "accounts.json"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._hasher = hasher or make_admin_hasher()
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = self._read()
        # Verifying against this when the name is unknown makes "no such account" cost as much
        # time as "wrong password": timing does not reveal which names exist.
        self._decoy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def _read(self) -> dict[str, Account]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a {FORMAT} file")
        return {item["name"]: Account(**item) for item in data.get("accounts", [])}

    def _write(self) -> None:
        doc = {"format": FORMAT, "accounts": [attrs.asdict(a) for a in self.accounts()]}
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)

    # -- reading ---------------------------------------------------------------------------------

    def accounts(self) -> list[Account]:
        return [self._accounts[n] for n in sorted(self._accounts)]

    def get(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def verify(self, name: str, password: str) -> bool:
        """True when `password` is the account's (blocking: run it in a thread)."""
        account = self._accounts.get(name)
        stored = account.password_hash if account is not None else None
        try:
            self._hasher.verify(stored or self._decoy_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
        return stored is not None

    # -- changing (blocking: threads) -----------------------------------------------------------

    def ensure_initial_admin(self) -> Path | None:
        """With no account at all: create `admin` with a random password written to the
        password file (mode 0600); return that file's path. Otherwise None."""
        with self._lock:
            if self._accounts:
                return None
            password = secrets.token_urlsafe(18)
            now = self._clock()
            self._accounts[INITIAL_ADMIN] = Account(
                INITIAL_ADMIN, self._hasher.hash(password), created_at=now, created_by="first start",
                password_changed_at=now,
            )
            target = self.state_dir / PASSWORD_FILE
            atomic_write(target, (password + "\n").encode("utf-8"), mode=0o600)
            self._write()
            return target

    def add(self, name: str, password: str, *, by: str) -> Account:
        check_account_name(name)
        check_new_password(password)
        password_hash = self._hasher.hash(password)
        with self._lock:
            if name in self._accounts:
                raise AccountError("name", f"there is already an account {name!r}")
            account = Account(name, password_hash, created_at=self._clock(), created_by=by,
                              password_changed_at=self._clock())
            self._accounts[name] = account
            self._write()
            return account

    def set_password(self, name: str, password: str) -> None:
        check_new_password(password)
        password_hash = self._hasher.hash(password)
        with self._lock:
            account = self._accounts.get(name)
            if account is None:
                raise AccountError("name", f"there is no account {name!r}")
            self._accounts[name] = attrs.evolve(account, password_hash=password_hash,
                                                password_changed_at=self._clock())
            self._write()

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._accounts:
                raise AccountError("name", f"there is no account {name!r}")
            if len(self._accounts) == 1:
                raise AccountError("name", "the last account cannot be removed")
            del self._accounts[name]
            self._write()

    def restore_hashes(self, entries: list[dict[str, Any]], *, by: str) -> tuple[list[str], list[str]]:
        """Accounts from a backup with their argon2id hashes: new ones are created, existing
        ones take the backup's password. Returns (created, passwords replaced)."""
        created, replaced = [], []
        with self._lock:
            for entry in entries:
                name = check_account_name(str(entry.get("name", "")))
                stored = entry.get("password_hash")
                if not isinstance(stored, str) or not stored.startswith("$argon2id$"):
                    continue
                existing = self._accounts.get(name)
                created_at = entry.get("created_at")
                if existing is None:
                    self._accounts[name] = Account(
                        name, stored,
                        created_at=float(created_at) if isinstance(created_at, (int, float)) else self._clock(),
                        created_by=f"restored by {by}", password_changed_at=entry.get("password_changed_at"),
                    )
                    created.append(name)
                elif existing.password_hash != stored:
                    self._accounts[name] = attrs.evolve(existing, password_hash=stored,
                                                        password_changed_at=entry.get("password_changed_at"))
                    replaced.append(name)
            if created or replaced:
                self._write()
        return created, replaced

    def restore_public(self, entries: list[dict[str, Any]], *, by: str) -> list[str]:
        """Create the accounts a backup names that do not exist here, without a password
        (an administrator sets one before they can log in). Returns the names created."""
        created = []
        with self._lock:
            for entry in entries:
                name = check_account_name(str(entry.get("name", "")))
                if name in self._accounts:
                    continue
                created_at = entry.get("created_at")
                self._accounts[name] = Account(
                    name, None,
                    created_at=float(created_at) if isinstance(created_at, (int, float)) else self._clock(),
                    created_by=f"restored by {by}",
                )
                created.append(name)
            if created:
                self._write()
        return created


__all__ = [
    "INITIAL_ADMIN",
    "MIN_PASSWORD_LENGTH",
    "Account",
    "AccountError",
    "AccountStore",
    "check_account_name",
    "check_new_password",
    "make_admin_hasher",
]
