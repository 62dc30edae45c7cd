"""Clients that reject the inspection certificate (pinned apps), tallied per host.

A handshake that fails with an alert from the client, or a client that hangs up mid-handshake,
counts against the host; a completed handshake does not clear the tally (another client may pin).
The portal lists the hosts with the most rejections, for a one-click bypass.
"""

from __future__ import annotations

import time

import attrs

MAX_HOSTS = 1000


@attrs.define
class PinnedHost:
    host: str
    rejections: int = 0
    accepted: int = 0
    last_alert: str = ""
    last_client: str = ""
    last_time: float = 0.0

    def to_json(self) -> dict:
        return attrs.asdict(self)


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
        entry.last_time = self._clock()

    def accepted(self, host: str) -> None:
        entry = self._hosts.get(host)
        if entry is not None:
            entry.accepted += 1

    def top(self, n: int = 100) -> list[PinnedHost]:
        return sorted(self._hosts.values(), key=lambda e: (-e.rejections, e.host))[:n]


__all__ = ["PinnedClients", "PinnedHost"]
