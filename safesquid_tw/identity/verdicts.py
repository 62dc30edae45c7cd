"""Directory verdicts remembered for a while, as keyed digests, never as passwords.

A directory user's verdict is kept for the directory's `cache_seconds` (a password changed or an
account disabled in the directory takes effect within that time), a wrong password for a few
seconds (a burst of retries from one browser costs one bind). When the directory is down, users
whose verdict is still fresh keep working; nobody new gets in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from safesquid_tw.policy.model import MISS

V = TypeVar("V")

FAILURE_SECONDS = 5.0
LIMIT = 10000


class ExpiringVerdicts(Generic[V]):
    """Key -> (value, deadline): good and bad verdicts with their own lifetimes, bounded."""

    def __init__(self, clock: Callable[[], float], good_seconds: float,
                 bad_seconds: float = FAILURE_SECONDS, limit: int = LIMIT) -> None:
        self._clock = clock
        self._good_seconds = good_seconds
        self._bad_seconds = bad_seconds
        self._limit = limit
        self._table: OrderedDict[bytes, tuple[V | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes):
        """The remembered value, None for a remembered failure, or MISS."""
        found = self._table.get(key)
        if found is None:
            return MISS
        value, deadline = found
        if self._clock() >= deadline:
            with self._lock:
                if self._table.get(key) is found:
                    del self._table[key]
            return MISS
        return value

    def remember(self, key: bytes, value: V | None) -> None:
        seconds = self._good_seconds if value is not None else self._bad_seconds
        if seconds <= 0:
            return
        with self._lock:
            self._table.pop(key, None)
            while len(self._table) >= self._limit:
                self._table.popitem(last=False)
            self._table[key] = (value, self._clock() + seconds)

    def __len__(self) -> int:
        return len(self._table)


__all__ = ["ExpiringVerdicts", "FAILURE_SECONDS"]
