"""Slowing down password guessing through the proxy's Basic authentication.

Every wrong password from one client address makes its next 407 come later (after a few free
mistakes), up to a ceiling; a right one clears the count. The table is bounded, so a flood of
addresses cannot grow it without end.
"""

from __future__ import annotations

from collections import OrderedDict

FREE_FAILURES = 3  # typing mistakes cost nothing
FIRST_DELAY = 0.5
MAX_DELAY = 8.0
MAX_CLIENTS = 10000


class GuessingBrake:
    def __init__(self) -> None:
        self._failures: OrderedDict[str, int] = OrderedDict()

    def failed(self, client: str) -> float:
        """Count a wrong password; the seconds to wait before answering it."""
        count = self._failures.pop(client, 0) + 1
        self._failures[client] = count
        if len(self._failures) > MAX_CLIENTS:
            self._failures.popitem(last=False)
        if count <= FREE_FAILURES:
            return 0.0
        return min(MAX_DELAY, FIRST_DELAY * 2 ** (count - FREE_FAILURES - 1))

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
