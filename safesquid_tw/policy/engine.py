"""The pure decision function, for callers that prefer a function to a method."""

from __future__ import annotations

from safesquid_tw.policy.compiled import CompiledPolicy, Policy
from safesquid_tw.policy.model import Decision, RequestFacts


def decide(policy: CompiledPolicy | Policy, facts: RequestFacts) -> Decision:
    """The decision of `policy` (a compiled policy, or a Policy version) for one request."""
    compiled = policy.compiled if isinstance(policy, Policy) else policy
    return compiled.decide(facts)


__all__ = ["decide"]
