"""The request-target of a forward-proxy request (RFC 9112 3.2), parsed strictly.

A forward proxy receives absolute-form (``http://host/path``) for ordinary requests and
authority-form (``host:port``) for CONNECT. The host that comes out is the one the policy
engine matches and the one the proxy connects to, so it is normalised to exactly one spelling
and anything another parser could read as a different host is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import attrs

from safesquid_tw.proxy.http1 import ProtocolError
from safesquid_tw.proxy.urlnorm import normalise_path

__all__ = ["Target", "host_header_for", "is_asterisk_options", "parse_target"]

DEFAULT_PORTS = {"http": 80, "https": 443}

# scheme "://" authority [ path-abempty ] [ "?" query ], visible ASCII only, no fragment.
_ABSOLUTE_FORM = re.compile(
    rb"([A-Za-z][A-Za-z0-9+.\-]*)://([\x21\x22\x24-\x2e\x30-\x3e\x40-\x7e]*)"
    rb"([/?][\x21\x22\x24-\x7e]*)?"
)
_USERINFO = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")
# DNS names only (plus "_", found in real host names): sub-delims allowed by RFC 3986 reg-name
# mean nothing to a resolver and only help to confuse log readers and other parsers.
_HOST_NAME = re.compile(rb"[a-z0-9_\-]{1,63}(?:\.[a-z0-9_\-]{1,63})*")
_DOTTED_QUAD = re.compile(rb"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                          rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")
_NUMERIC_LABEL = re.compile(rb"(?:[0-9]+|0[xX][0-9A-Fa-f]*)")
_INVISIBLE = re.compile(rb"[^\x21-\x7e]")


@attrs.frozen(slots=True)
class Target:
    """Where a proxy request goes.

    scheme: "http" or "https" (absolute-form), "tunnel" (CONNECT).
    host: lower-case ASCII (IDNA A-labels), no trailing dot; IPv6 without brackets.
    path: origin-form for the upstream request line ("/" at least); "" for a tunnel. The client's
        own spelling, unless it had dot-segments (see `safesquid_tw.proxy.urlnorm`).
    match_path: the path (and query) rules match, normalised (`urlnorm.normalise_path`).
    other_paths: further readings of the path an origin could make; every one must be allowed.
    """

    scheme: str
    host: str
    port: int
    path: str
    had_userinfo: bool = False
    # Derived from the path: left out of comparisons.
    match_path: str = attrs.field(default="", eq=False)
    other_paths: tuple[str, ...] = attrs.field(default=(), eq=False)

    def authority(self) -> str:
        """host[:port], with brackets around IPv6; the port is omitted when it is the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if DEFAULT_PORTS.get(self.scheme) == self.port:
            return host
        return f"{host}:{self.port}"

    def url_for_log(self) -> str:
        """The URL without userinfo (credentials are never logged); a tunnel logs host:port."""
        if self.scheme == "tunnel":
            return self.authority()
        return f"{self.scheme}://{self.authority()}{self.path}"


def host_header_for(target: Target) -> bytes:
    """The Host field value for the upstream request (RFC 9110 7.2)."""
    return target.authority().encode("ascii")


def is_asterisk_options(method: bytes, target: bytes) -> bool:
    """``OPTIONS *``: a question to the proxy itself, which the caller answers directly."""
    return target == b"*" and method == b"OPTIONS"


def parse_target(method: bytes, target: bytes) -> Target:
    """Parse a proxy request-target; raises ProtocolError(400, ...) for anything else.

    CONNECT takes authority-form ``host:port`` only; every other method absolute-form with an
    http or https scheme. Userinfo (``http://user:pass@host/``) is refused: it is deprecated
    (RFC 9110 4.2.4) and the password would travel in clear; the error never repeats it.
    Origin-form and asterisk-form are refused: check ``is_asterisk_options`` first to answer
    ``OPTIONS *``.
    """
    if method == b"CONNECT":
        return _parse_connect_target(target)
    # A Target is immutable and a pure function of the target's bytes: a URL asked for again
    # (a keep-alive client's polling, a page's shared assets) is a look-up (bounded, successes only).
    found = _ABSOLUTE_TARGETS.get(target)
    if found is not None:
        return found
    parsed = _parse_absolute_target(target)
    if len(target) <= _ABSOLUTE_TARGET_MAX:
        if len(_ABSOLUTE_TARGETS) >= _ABSOLUTE_TARGET_ENTRIES:
            _ABSOLUTE_TARGETS.clear()
        _ABSOLUTE_TARGETS[target] = parsed
    return parsed


_ABSOLUTE_TARGETS: dict[bytes, Target] = {}
_ABSOLUTE_TARGET_ENTRIES = 1024
_ABSOLUTE_TARGET_MAX = 512


def _parse_absolute_target(target: bytes) -> Target:
    m = _ABSOLUTE_FORM.fullmatch(target)
    if m is None:
        raise ProtocolError(400, _diagnose_target(target))
    scheme_bytes, authority, path = m.groups()
    scheme = _SCHEMES.get(scheme_bytes) or _SCHEMES.get(scheme_bytes.lower())
    if scheme is None:
        raise ProtocolError(400, f"unsupported URL scheme {scheme_bytes.decode('ascii')!r}")
    host, port, userinfo = _parse_authority(authority, DEFAULT_PORTS[scheme])
    if userinfo:
        raise ProtocolError(400, "credentials (userinfo) in the request target are not allowed")
    if not path:
        path_text = "/"
    elif path[0] == 0x3F:  # "?": path-abempty is empty, the query follows
        path_text = "/" + path.decode("ascii")
    else:
        path_text = path.decode("ascii")
    if "%" in path_text or "\\" in path_text or "//" in path_text or "/." in path_text:
        normal = normalise_path(path_text)
        return Target(scheme, host, port, normal.forward, False, normal.decision, normal.others)
    return Target(scheme, host, port, path_text, False, path_text)  # already in normal form


_SCHEMES = {b"http": "http", b"https": "https"}


@functools.lru_cache(maxsize=4096)
def _parse_connect_target(target: bytes) -> Target:
    # Cached whole: a CONNECT target is only host:port, and the same few recur constantly.
    if b"/" in target:
        raise ProtocolError(400, "CONNECT needs an authority-form target host:port")
    if _INVISIBLE.search(target):
        raise ProtocolError(400, "invalid character in request target")
    host, port, userinfo = _parse_authority(target, 0)
    if userinfo:
        raise ProtocolError(400, "userinfo is not allowed in a CONNECT target")
    return Target("tunnel", host, port, "", False)


def _diagnose_target(target: bytes) -> str:
    if target == b"*":
        return "a forward proxy needs an absolute URL (asterisk-form is for OPTIONS * only)"
    if target[:1] == b"/":
        return "a forward proxy needs an absolute URL (got origin-form)"
    if _INVISIBLE.search(target):
        return "invalid character in request target"
    if b"#" in target:
        return "fragment in request target"
    if b"://" not in target:
        return "a forward proxy needs an absolute URL"
    return "malformed absolute URL"


@functools.lru_cache(maxsize=4096)
def _parse_authority(authority: bytes, default_port: int) -> tuple[str, int, bool]:
    """(host, port, had_userinfo); ``default_port`` 0 means the port is required.

    Cached: a busy proxy sees the same few thousand authorities over and over.
    """
    had_userinfo = False
    at = authority.rfind(b"@")
    if at != -1:
        if not _USERINFO.fullmatch(authority, 0, at):
            raise ProtocolError(400, "invalid userinfo in request target")
        authority = authority[at + 1:]
        had_userinfo = True
    if authority[:1] == b"[":
        close = authority.find(b"]")
        if close == -1:
            raise ProtocolError(400, "unterminated IPv6 literal")
        host = _parse_ipv6(authority[1:close])
        rest = authority[close + 1:]
        if rest and rest[:1] != b":":
            raise ProtocolError(400, "junk after IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host_bytes, colon, port_text = authority.partition(b":")
        host = _parse_host_name(host_bytes)
        if not colon:
            port_text = None
    return host, _parse_port(port_text, default_port), had_userinfo


def _parse_ipv6(literal: bytes) -> str:
    # Zone identifiers ("%25eth0") are refused with the other percent-encodings; IPvFuture
    # ("v1.x") does not parse as an address either.
    if b"%" in literal:
        raise ProtocolError(400, "percent-encoding in host")
    try:
        address = ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included
        raise ProtocolError(400, "invalid IPv6 address") from None
    return address.compressed


def _parse_host_name(host: bytes) -> str:
    if not host:
        raise ProtocolError(400, "empty host")
    if b"%" in host:
        raise ProtocolError(400, "percent-encoding in host")
    host = host.lower()
    if host[-1:] == b".":
        host = host[:-1]
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ProtocolError(400, "invalid host name")
    # Resolvers read "127.1", "0x7f.0.0.1" and "2130706433" as IPv4 addresses: a name whose
    # last label is numeric must be a canonical dotted quad, or the policy engine and the
    # resolver would disagree about which host this is.
    last_label = host.rpartition(b".")[2]
    if _NUMERIC_LABEL.fullmatch(last_label) and not _DOTTED_QUAD.fullmatch(host):
        raise ProtocolError(400, "ambiguous numeric host (not a dotted-quad IPv4 address)")
    return host.decode("ascii")


def _parse_port(port_text: bytes | None, default_port: int) -> int:
    if not port_text:
        # "host:" with an empty port means the default (RFC 3986 3.2.3), except for CONNECT.
        if not default_port:
            raise ProtocolError(400, "CONNECT needs an authority-form target host:port")
        return default_port
    if len(port_text) > 5 or not port_text.isdigit():
        raise ProtocolError(400, "invalid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ProtocolError(400, "port out of range")
    return port
