"""Clients that reject the inspection certificate (pinned apps), tallied per host.

A handshake that fails with an alert from the client, or a client that hangs up mid-handshake,
counts against the host; a completed handshake does not clear the tally (another client may pin).
The portal lists the hosts with the most rejections, for a one-click bypass.
"""

from __future__ import annotations

import time
from collections import deque

import attrs

MAX_HOSTS = 1000
AUTO_WINDOW = 600.0  # rejections counted for auto-bypass within this many seconds
AUTO_BYPASS_FOR = 3600.0  # a host that reached the threshold is spliced this long


@attrs.define
class PinnedHost:
    host: str
    rejections: int = 0
    accepted: int = 0
    last_alert: str = ""
    last_client: str = ""
    last_time: float = 0.0
    recent: deque = attrs.field(factory=lambda: deque(maxlen=MAX_HOSTS), repr=False)
    bypass_until: float = 0.0

    def to_json(self) -> dict:
        return attrs.asdict(self, filter=lambda a, v: a.name != "recent")


class PinnedClients:
    def __init__(self, *, clock=time.time) -> None:
        self._hosts: dict[str, PinnedHost] = {}
        self._clock = clock

    def rejected(self, host: str, client: str, alert: str) -> None:
        entry = self._hosts.get(host)
        if entry is None:
            if len(self._hosts) >= MAX_HOSTS:
                # Forget the host rejected longest ago: the list is for what happens now.
                oldest = min(self._hosts.values(), key=lambda e: e.last_time)
                del self._hosts[oldest.host]
            entry = self._hosts[host] = PinnedHost(host)
        entry.rejections += 1
        entry.last_alert = alert[:200]
        entry.last_client = client
        entry.last_time = now = self._clock()
        entry.recent.append(now)

    def accepted(self, host: str) -> None:
        entry = self._hosts.get(host)
        if entry is not None:
            entry.accepted += 1

    def auto_bypassed(self, host: str, threshold: int) -> bool:
        """With `auto_bypass_pinned` = threshold > 0: has this host been rejected `threshold`
        times within AUTO_WINDOW? Then it is spliced for AUTO_BYPASS_FOR seconds."""
        entry = self._hosts.get(host)
        if entry is None or threshold <= 0:
            return False
        now = self._clock()
        if entry.bypass_until > now:
            return True
        recent = entry.recent
        while recent and recent[0] < now - AUTO_WINDOW:
            recent.popleft()
        if len(recent) >= threshold:
            entry.bypass_until = now + AUTO_BYPASS_FOR
            recent.clear()
            return True
        return False

    def top(self, n: int = 100) -> list[PinnedHost]:
        return sorted(self._hosts.values(), key=lambda e: (-e.rejections, e.host))[:n]


__all__ = ["PinnedClients", "PinnedHost"]
