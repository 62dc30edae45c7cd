"""What a node reports about itself on /health and its status page.

The node mutates one NodeState as it starts, loads policy, drains and stops; readers only look.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import attrs


@attrs.define
class NodeState:
    role: str
    node: str
    policy_version: int | None = None
    policy_digest: str | None = None
    draining: bool = False
    shutting_down: bool = False
    policy_source: str | None = None  # "file", "cache", "master", ...
    started: float = 0.0  # epoch seconds; 0 means not started yet
    # Where "now" comes from, so uptimes are testable; a running node keeps the default.
    now: Callable[[], float] = attrs.field(default=time.time, repr=False, eq=False)
    # More sections of the /health JSON, by key (the spool, the master connection, the directory):
    # each a function returning a JSON-able value, or None to leave its key out. They never
    # change the status code.
    health_parts: dict[str, Callable[[], Any]] = attrs.field(factory=dict, repr=False, eq=False)
    # Connections the proxy closed at its edge, by reason (ProxyFactory.edge_counters); None: no proxy.
    edge: Callable[[], dict[str, int]] | None = attrs.field(default=None, repr=False, eq=False)
    policy_since: float | None = None  # epoch seconds the policy in force was installed here
    # The anti-virus scanner's figures (Scanner.health) on nodes that proxy: None when it is off.
    antivirus: Callable[[], dict] | None = attrs.field(default=None, repr=False, eq=False)
    # More conditions for "ready" (a node with --workers: some worker takes connections).
    ready_gates: list[Callable[[], bool]] = attrs.field(factory=list, repr=False, eq=False)

    @property
    def ready(self) -> bool:
        """Able to take traffic: a policy is loaded and the node is neither draining nor stopping."""
        return (self.policy_version is not None and not self.draining and not self.shutting_down
                and all(gate() for gate in self.ready_gates))

    @property
    def status(self) -> str:
        """One word for people and load balancers: ready, starting, draining or stopping."""
        if self.shutting_down:
            return "stopping"
        if self.draining:
            return "draining"
        if self.policy_version is None or not all(gate() for gate in self.ready_gates):
            return "starting"
        return "ready"

    @property
    def uptime_s(self) -> float | None:
        if not self.started:
            return None
        return max(0.0, self.now() - self.started)

    def as_health_json(self) -> dict[str, Any]:
        uptime = self.uptime_s
        health = {
            "role": self.role,
            "node": self.node,
            "ready": self.ready,
            "status": self.status,
            "policy_version": self.policy_version,
            "policy_digest": self.policy_digest,
            "policy_source": self.policy_source,
            "draining": self.draining,
            "uptime_s": None if uptime is None else round(uptime, 3),
            "policy_age_s": None if self.policy_since is None else round(max(0.0, self.now() - self.policy_since), 3),
            **{name: value for name, part in self.health_parts.items() if (value := part()) is not None},
            **({"edge": self.edge()} if self.edge is not None else {}),
        }
        antivirus = self.antivirus() if self.antivirus is not None else None
        if antivirus is not None:
            health["antivirus"] = antivirus
        return health


__all__ = ["NodeState"]
