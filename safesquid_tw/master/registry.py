"""What the master knows about each slave: the cluster view.

One `SlaveRecord` per node name, kept after the slave disconnects (so the view shows when it was
last seen). A connected slave also has a session (the control-plane connection) through which
tasks are sent.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import attrs
from twisted.internet import defer

from safesquid_tw.icap import status as antivirus_status

CLOCK_OFFSET_WARNING = 3.0  # seconds; the reference documents ask for NTP on every node
TASKS = ("reload", "drain", "resume")


class SlaveSession(Protocol):
    def send_task(self, task: str) -> defer.Deferred: ...
    def is_alive(self) -> defer.Deferred: ...
    def disconnect(self, reason: str) -> None: ...


@attrs.define
class SlaveRecord:
    name: str
    address: str = ""
    product_version: str = ""
    connected: bool = False
    connected_since: float | None = None
    last_seen: float | None = None
    disconnected_at: float | None = None
    policy_version: int | None = None
    policy_digest: str | None = None
    policy_applied_at: float | None = None
    policy_error: str | None = None
    policy_source: str | None = None
    backlog_records: int = 0
    dropped_records: int = 0
    requests_per_second: float = 0.0
    requests_total: int = 0
    clock_offset: float | None = None
    draining: bool = False
    ready: bool = False
    directory: str | None = None  # the user directory as the node sees it; None: no directory
    spool_problem: str | None = None  # why the slave cannot write its spool, while it cannot
    antivirus: list = attrs.field(factory=list)  # the slave's ICAP services (icap/status.py)

    def warnings(self, current_version: int | None) -> list[str]:
        out = []
        if not self.connected:
            out.append("not connected")
        if self.clock_offset is not None and abs(self.clock_offset) > CLOCK_OFFSET_WARNING:
            out.append(f"clock is {self.clock_offset:+.1f} s off the master's: check NTP")
        if self.policy_error:
            out.append(f"refused a policy: {self.policy_error}")
        if current_version is not None and self.connected and self.policy_version != current_version:
            out.append(f"runs policy version {self.policy_version}, not {current_version}")
        if self.dropped_records:
            out.append(f"{self.dropped_records} access records dropped while the master was away")
        if self.spool_problem:
            out.append(self.spool_problem)
        if self.draining:
            out.append("draining")
        if self.directory and self.directory.startswith("unreachable"):
            out.append(f"user directory {self.directory}")
        out.extend(antivirus_status.warnings(self.antivirus))
        return out

    def as_json(self, current_version: int | None = None) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["warnings"] = self.warnings(current_version)
        return data


class SlaveRegistry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.records: dict[str, SlaveRecord] = {}
        self.sessions: dict[str, SlaveSession] = {}

    def record(self, name: str) -> SlaveRecord:
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = SlaveRecord(name=name)
        return rec

    def attach(self, name: str, session: SlaveSession, *, address: str, product_version: str) -> SlaveRecord:
        now = self._clock()
        rec = self.record(name)
        rec.address = address
        rec.product_version = product_version
        rec.connected = True
        rec.connected_since = now
        rec.last_seen = now
        rec.disconnected_at = None
        self.sessions[name] = session
        return rec

    def detach(self, name: str, session: SlaveSession) -> None:
        if self.sessions.get(name) is not session:
            return  # a newer connection of the same node took the name over
        del self.sessions[name]
        rec = self.record(name)
        rec.connected = False
        rec.disconnected_at = self._clock()

    def seen(self, name: str) -> None:
        rec = self.records.get(name)
        if rec is not None:
            rec.last_seen = self._clock()

    def connected_names(self) -> list[str]:
        return sorted(self.sessions)

    def send_task(self, name: str, task: str) -> defer.Deferred:
        if task not in TASKS:
            return defer.fail(ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}"))
        session = self.sessions.get(name)
        if session is None:
            return defer.fail(KeyError(f"node {name!r} is not connected"))
        return session.send_task(task)

    def snapshot(self, current_version: int | None = None) -> list[dict[str, Any]]:
        return [self.records[n].as_json(current_version) for n in sorted(self.records)]
