"""What one request carries through the proxy, and how its credentials and fields are read."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from safesquid_tw.proxy import http1
from safesquid_tw.proxy.headers import connection_options
from safesquid_tw.proxy.target import Target


class RequestContext:
    """Everything known about one request; the access record is made from it at the end."""

    __slots__ = (
        "start", "method", "version", "target", "url", "policy", "framing", "client_close", "user",
        "status", "action", "rule", "category", "application", "detail", "dlp", "bytes_in",
        "head", "groups", "transfer", "tls",
    )

    def __init__(self, start: float, head: http1.RequestHead, target: Target, policy, framing) -> None:
        self.start = start
        self.head = head
        self.method = head.method
        self.version = head.version
        self.target = target
        self.url = target.url_for_log()
        self.policy = policy
        self.framing = framing
        # As client_wants_close, from the head's field index rather than a walk over every field.
        tokens = connection_options(head.values(b"connection"))
        self.client_close = b"close" in tokens or (head.version != b"HTTP/1.1" and b"keep-alive" not in tokens)
        self.user: str | None = None
        self.status = 0
        self.action = "allow"
        self.rule: str | None = None
        self.category: str | None = None
        self.application: str | None = None
        self.detail: str | None = None
        self.dlp: tuple[str, ...] = ()
        self.bytes_in = 0
        self.groups: frozenset[str] = frozenset()
        self.transfer = "complete"  # "origin_incomplete" | "client_aborted": the response was cut short
        self.tls: str | None = None  # "inspected", "bypassed" (a spliced CONNECT), None: plain HTTP


def basic_credentials(value: bytes | None) -> tuple[str, str] | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


class HeaderView(Mapping):
    """The request's fields as the policy sees them (lower-case names, text values), decoded
    only when an application signature actually asks for one: most requests never do."""

    __slots__ = ("_head",)

    def __init__(self, head: http1.RequestHead) -> None:
        self._head = head

    def __getitem__(self, name: str) -> str:
        value = self._head.get(name.encode("latin-1"))
        if value is None:
            raise KeyError(name)
        return value.decode("latin-1")

    def get(self, name: str, default=None):
        value = self._head.get(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def __iter__(self):
        return iter(dict.fromkeys(n.decode("latin-1").lower() for n, _v in self._head.headers))

    def __len__(self) -> int:
        return sum(1 for _ in self)
