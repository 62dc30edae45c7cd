"""The plain values that flow into and out of the policy engine.

`RequestFacts` is everything the engine may look at for one request; `Decision` is its answer.
Both are frozen so a request's facts and verdict can be handed to logging and reporting without
anyone changing them on the way.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Literal

import attrs

ALLOW = "allow"
DENY = "deny"
ACTIONS = (ALLOW, DENY)

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@attrs.frozen(slots=True)
class RequestFacts:
    """One request as the policy sees it.

    `path` is the path and query (`"/a/b?x=1"`), empty for CONNECT. `headers` maps lower-case
    header names to values; only application signatures look at them. `now` is an aware datetime
    (a naive one is taken as UTC) or POSIX seconds (the proxy passes its reactor's clock); None
    means "the current time".
    """

    client_ip: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    user: str | None = None
    groups: frozenset[str] = frozenset()
    headers: Mapping[str, str] = _NO_HEADERS
    now: datetime | float | None = None
    tls: str | None = None  # "inspected", "bypassed" or "plain" (policy/tlsrules.py); None: not known


@attrs.frozen(slots=True)
class Decision:
    """The engine's verdict: `rule` is None when the default action decided."""

    action: str
    rule: str | None
    reason: str
    category: str | None
    application: str | None

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW


@attrs.frozen(slots=True)
class Identity:
    """An authenticated user and the groups the policy gives them."""

    user: str
    groups: frozenset[str]
    # DNs of the user's groups in the directory (empty for local users and without a directory)
    directory_groups: frozenset[str] = frozenset()


@attrs.frozen(slots=True)
class DlpHit:
    """One DLP detector that found something; `action` is "block" or "log"."""

    detector: str
    action: str


class CacheMiss(enum.Enum):
    """The credentials cache has no verdict: the caller must verify the password the slow way."""

    MISS = "miss"


MISS = CacheMiss.MISS
CachedIdentity = Identity | None | Literal[CacheMiss.MISS]

__all__ = [
    "ACTIONS",
    "ALLOW",
    "DENY",
    "MISS",
    "CacheMiss",
    "CachedIdentity",
    "Decision",
    "DlpHit",
    "Identity",
    "RequestFacts",
]
