"""X-Forwarded-For as a gateway writes it, and who the client is behind a downstream proxy.

Policy section `forwarding` (docs/policy-format.md):
- `x_forwarded_for`: what goes upstream. `append` (the default) adds the address of the
  connection's client (the PROXY header's source on a `haproxy:` listener, else the socket's peer)
  to what the client sent, as a chain of proxies does; `replace` sends only the client's identity;
  `delete` sends no X-Forwarded-For and no `Forwarded`; `transparent` leaves both untouched.
- `trusted_downstream`: networks of downstream proxies. Only a connection from one of them has
  its X-Forwarded-For read, and then the right-most address not in those networks is the client
  (for rules, authentication exemptions and records). Anybody else's X-Forwarded-For never
  changes who the client is.

Both are pure functions over header lists, compiled once per policy version into `Forwarding`.
"""

from __future__ import annotations

from collections.abc import Iterable

from safesquid_tw.policy.networks import NetworkSet, parse_address

MODES = ("append", "replace", "delete", "transparent")
DEFAULT_MODE = "append"
MAX_HOPS = 64  # addresses read from X-Forwarded-For, right to left: a long list costs no more

Headers = list[tuple[bytes, bytes]]


def _address(token: bytes) -> str | None:
    """An address of an X-Forwarded-For list (`1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:80`, bare IPv6)."""
    text = token.strip().decode("latin-1")
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text if text and parse_address(text) is not None else None


def client_identity(peer: str, xff_values: Iterable[bytes], trusted: NetworkSet | None) -> str:
    """Who the client is: `peer`, unless `peer` is a trusted downstream proxy.

    Then the X-Forwarded-For list (every field, in order) is read from the right; the first
    address not in `trusted` is the client. Where the list ends, or holds something that is no
    address, before such an address, the last trusted address read is the client (the nearest
    hop that can still be believed)."""
    if trusted is None or peer not in trusted:
        return peer
    tokens: list[bytes] = []
    for value in xff_values:
        tokens.extend(value.split(b","))
    identity = peer
    for token in reversed(tokens[-MAX_HOPS:]):
        if not token.strip():
            continue
        address = _address(token)
        if address is None:
            break
        identity = address
        if address not in trusted:
            break
    return identity


def rewrite(headers: Headers, mode: str, peer: str, identity: str) -> Headers:
    """The request's header list as it goes upstream (a new list unless nothing changes).

    `peer` is the connection's client (added by `append`), `identity` the client after
    `trusted_downstream` (the only address `replace` sends)."""
    if mode == "transparent":
        return headers
    if mode == "delete":
        return [(n, v) for n, v in headers if n.lower() not in (b"x-forwarded-for", b"forwarded")]
    kept: Headers = []
    previous: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            previous.append(value.strip())
        else:
            kept.append((name, value))
    own = peer.encode("ascii", "replace")
    if mode == "replace":
        kept.append((b"X-Forwarded-For", identity.encode("ascii", "replace")))
    else:
        chain = b", ".join([p for p in previous if p] + [own])
        kept.append((b"X-Forwarded-For", chain))
    return kept


class Forwarding:
    """The `forwarding` section of one policy version, compiled."""

    __slots__ = ("mode", "trusted")

    def __init__(self, section: dict) -> None:
        self.mode: str = section.get("x_forwarded_for", DEFAULT_MODE)
        networks = section.get("trusted_downstream", [])
        self.trusted: NetworkSet | None = NetworkSet(networks) if networks else None

    def identity(self, peer: str, head) -> str:
        """The client of one request (head: an http1.RequestHead)."""
        if self.trusted is None:
            return peer
        return client_identity(peer, head.get_all(b"x-forwarded-for"), self.trusted)


__all__ = ["DEFAULT_MODE", "MODES", "Forwarding", "client_identity", "rewrite"]
