"""Refused login attempts in the audit log, at a bounded cost however many arrive.

A throttled, parallel or "busy" login is refused before any password check, but writing one
fsynced audit line per refusal on the reactor thread would let a flood of them stall the proxy.
So the first refusal of a window is written at once (in a worker thread), and the others of the
same window are counted per client address and written as one line when the window closes:
`{"event": "login", "outcome": "refused", "repeated": {"192.0.2.7": 199}, ...}`. Nothing is
dropped from the count; at most `MAX_ADDRESSES` addresses are named per line (the rest summed).
"""

from __future__ import annotations

from typing import Any, Callable

WINDOW = 10.0
MAX_ADDRESSES = 50


class RefusedLogins:
    def __init__(self, audit: Any, reactor: Any, in_thread: Callable[..., Any], *, window: float = WINDOW) -> None:
        self._audit = audit
        self._reactor = reactor
        self._in_thread = in_thread
        self.window = window
        self._counts: dict[str, int] = {}
        self._other = 0
        self._accounts: set[str] = set()
        self._open = False

    def refused(self, account: str, address: str, reason: str, **fields: Any) -> None:
        if not self._open:
            self._open = True
            self._reactor.callLater(self.window, self._close)
            self._write(dict(actor=account, address=address, outcome="refused", reason=reason, **fields))
            return
        if address in self._counts or len(self._counts) < MAX_ADDRESSES:
            self._counts[address] = self._counts.get(address, 0) + 1
        else:
            self._other += 1
        if len(self._accounts) < MAX_ADDRESSES:
            self._accounts.add(account)

    def _close(self) -> None:
        counts, other, accounts = self._counts, self._other, self._accounts
        self._counts, self._other, self._accounts, self._open = {}, 0, set(), False
        if counts or other:
            self._write(dict(actor=None, address=None, outcome="refused", reason="repeated refusals",
                             repeated=counts, repeated_elsewhere=other, accounts=sorted(accounts),
                             window_s=self.window))

    def _write(self, fields: dict[str, Any]) -> None:
        d = self._in_thread(self._audit.record, "login", **fields)
        if hasattr(d, "addErrback"):
            d.addErrback(lambda failure: None)  # AuditLog.record reports its own write errors


__all__ = ["RefusedLogins"]
