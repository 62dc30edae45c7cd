"""What the master knows about each slave: the cluster view.

One `SlaveRecord` per node name, kept after the slave disconnects (so the view shows when it was
last seen). A connected slave also has a session (the control-plane connection) through which
tasks are sent.
"""

from __future__ import annotations

import json
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
    workers: list = attrs.field(factory=list)  # its worker processes (--workers): pid, state, version

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
            out.append(f"{self.dropped_records} access records dropped (spool cap or memory bound reached)")
        if self.spool_problem:
            out.append(self.spool_problem)
        if self.draining:
            out.append("draining")
        if self.directory and self.directory.startswith("unreachable"):
            out.append(f"user directory {self.directory}")
        out.extend(antivirus_status.warnings(self.antivirus))
        behind = [w for w in self.workers if w.get("state") != "exited" and w.get("policy_version") != self.policy_version]
        if behind:
            out.append(f"{len(behind)} worker(s) not on version {self.policy_version} yet")
        return out

    def as_json(self, current_version: int | None = None) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["warnings"] = self.warnings(current_version)
        return data


# What is remembered of a node across master restarts (`<state-dir>/nodes.json`).
_REMEMBERED = ("name", "address", "product_version", "last_seen", "disconnected_at", "policy_version",
               "policy_digest", "policy_source", "dropped_records")
NODES_FORMAT = "safesquid-nodes/1"


class SlaveRegistry:
    """The cluster view. With `path`, the nodes are remembered across master restarts: a node
    known before is listed as not connected until it returns, or until an administrator
    removes it (`forget`)."""

    def __init__(self, clock: Callable[[], float] = time.time, path: str | None = None) -> None:
        self._clock = clock
        self.records: dict[str, SlaveRecord] = {}
        self.sessions: dict[str, SlaveSession] = {}
        self.path = path
        self.problem: str | None = None  # why the node list could not be read or written
        if path is not None:
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                document = json.loads(f.read())
            if document.get("format") != NODES_FORMAT:
                raise ValueError(f"unknown format {document.get('format')!r}")
            for entry in document["nodes"]:
                fields = {k: entry[k] for k in _REMEMBERED if k in entry}
                rec = SlaveRecord(**fields)
                rec.connected = False
                rec.disconnected_at = rec.disconnected_at or rec.last_seen
                self.records[rec.name] = rec
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problem = f"{self.path} unreadable ({e}); the node list starts empty"

    def save(self) -> None:
        """Write the node list (small, rare: at connect, disconnect and removal)."""
        if self.path is None:
            return
        from safesquid_tw.util.atomic import atomic_write

        nodes = [{k: getattr(rec, k) for k in _REMEMBERED} for rec in self.records.values()]
        try:
            atomic_write(self.path, json.dumps({"format": NODES_FORMAT, "nodes": nodes}).encode(), mode=0o600)
            self.problem = None
        except OSError as e:
            self.problem = f"cannot write {self.path}: {e}"

    def forget(self, name: str) -> SlaveRecord:
        """Remove a departed or renamed node from the view (KeyError: unknown; ValueError:
        connected, it would come back at once)."""
        rec = self.records.get(name)
        if rec is None:
            raise KeyError(f"no node named {name!r}")
        if name in self.sessions:
            raise ValueError(f"node {name!r} is connected; only a node that is gone can be removed")
        del self.records[name]
        self.save()
        return rec

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
        self.save()
        return rec

    def detach(self, name: str, session: SlaveSession) -> None:
        if self.sessions.get(name) is not session:
            return  # a newer connection of the same node took the name over
        del self.sessions[name]
        rec = self.record(name)
        rec.connected = False
        rec.disconnected_at = self._clock()
        self.save()

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
