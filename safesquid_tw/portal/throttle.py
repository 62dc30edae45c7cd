"""Growing delays after failed portal logins, per account and per client address.

After the n-th failed login in a row for an account (or from an address), the next attempt for
it is refused, without even checking the password, until `base * 2**(n-1)` seconds have passed
(1, 2, 4, 8 ... seconds), capped: a guesser gets a few dozen tries an hour instead of thousands a
second. The account's cap is short, so that someone failing on purpose cannot lock an
administrator out for long; the address's cap is long. A success clears both; failures are
forgotten after `forget_after` seconds without another one.

Only one attempt per account and per address is checked at a time (`begin`/`end`): the others
are refused like throttled ones, before any hashing, so parallel guesses gain nothing.
"""

from __future__ import annotations

from typing import Callable

import attrs

ACCOUNT_CAP = 60.0
ADDRESS_CAP = 900.0
FORGET_AFTER = 3600.0
MAX_TRACKED = 50000


@attrs.define
class _Failures:
    count: int
    last: float


class LoginThrottle:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        base: float = 1.0,
        account_cap: float = ACCOUNT_CAP,
        address_cap: float = ADDRESS_CAP,
        forget_after: float = FORGET_AFTER,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self._clock = clock
        self.failed_total = 0
        self.base = base
        self.account_cap = account_cap
        self.address_cap = address_cap
        self.forget_after = forget_after
        self.max_tracked = max_tracked
        self._accounts: dict[str, _Failures] = {}
        self._addresses: dict[str, _Failures] = {}
        self._accounts_in_flight: set[str] = set()
        self._addresses_in_flight: set[str] = set()

    def _delay(self, failures: _Failures | None, cap: float) -> float:
        if failures is None or failures.count == 0:
            return 0.0
        return min(self.base * 2 ** min(failures.count - 1, 30), cap)

    def wait(self, account: str, address: str) -> float:
        """Seconds before a login for `account` from `address` may be tried; 0 when it may now."""
        now = self._clock()
        waits = []
        for table, key, cap in ((self._accounts, account, self.account_cap),
                                (self._addresses, address, self.address_cap)):
            failures = table.get(key)
            if failures is not None and now - failures.last >= self.forget_after:
                del table[key]
                continue
            if failures is not None:
                waits.append(failures.last + self._delay(failures, cap) - now)
        return max([0.0, *waits])

    def failed(self, account: str, address: str) -> float:
        """Count a failed login; returns the seconds the next attempt has to wait."""
        self.failed_total += 1  # for metrics: every failure since start, never forgotten
        now = self._clock()
        for table, key in ((self._accounts, account), (self._addresses, address)):
            failures = table.get(key)
            if failures is None or now - failures.last >= self.forget_after:
                if len(table) >= self.max_tracked:
                    self._prune(table, now)
                failures = table[key] = _Failures(0, now)
            failures.count += 1
            failures.last = now
        return self.wait(account, address)

    def begin(self, account: str, address: str) -> bool:
        """Mark an attempt for `account` from `address` as being checked; False (and nothing
        marked) when one for the same account or from the same address is still being checked.
        Parallel guesses would otherwise all pass `wait()` before the first failure counts."""
        if account in self._accounts_in_flight or address in self._addresses_in_flight:
            return False
        self._accounts_in_flight.add(account)
        self._addresses_in_flight.add(address)
        return True

    def end(self, account: str, address: str) -> None:
        self._accounts_in_flight.discard(account)
        self._addresses_in_flight.discard(address)

    @property
    def in_flight(self) -> int:
        return len(self._addresses_in_flight)

    def succeeded(self, account: str, address: str) -> None:
        self._accounts.pop(account, None)
        self._addresses.pop(address, None)

    def _prune(self, table: dict[str, _Failures], now: float) -> None:
        for key in [k for k, f in table.items() if now - f.last >= self.forget_after]:
            del table[key]
        if len(table) >= self.max_tracked:
            # Still full of recent failures: drop the oldest half rather than grow for ever.
            for key in sorted(table, key=lambda k: table[k].last)[: len(table) // 2]:
                del table[key]


__all__ = ["LoginThrottle"]
