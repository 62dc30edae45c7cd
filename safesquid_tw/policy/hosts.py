"""Host names: the domain patterns a policy lists and the hosts requests name.

A pattern is `example.com` (that host only) or `*.example.com` (every subdomain and
`example.com` itself). Both sides are compared lower-cased, without a trailing dot, with
international names in their ASCII (punycode) form, which is what clients put on the wire.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import threading
from collections.abc import Iterator

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
# A whole name of such labels: a policy lists up to hundreds of thousands of domains, and one
# match per name instead of one per label makes validating and compiling them markedly cheaper.
_LABEL_TEXT = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL_TEXT}\.)*{_LABEL_TEXT}\Z")
_MAX_NAME = 253


_memo = threading.local()


@contextlib.contextmanager
def domain_memo() -> Iterator[None]:
    """Within this block (in this thread), each pattern is parsed once: preparing a policy
    version parses every listed domain three times otherwise (checked, de-duplicated, compiled),
    and a big policy lists hundreds of thousands. The table goes when the block ends."""
    outer = getattr(_memo, "table", None)
    _memo.table = {} if outer is None else outer
    try:
        yield
    finally:
        _memo.table = outer


def parse_domain_pattern(pattern: str) -> tuple[bool, str]:
    """Split a policy domain pattern into (wildcard, normalised domain).

    Raises ValueError with a message fit for an administrator when the pattern is not a domain.
    """
    table = getattr(_memo, "table", None)
    if table is not None and type(pattern) is str:
        found = table.get(pattern)
        if found is None:
            found = table[pattern] = _parse_domain_pattern(pattern)  # an error is raised, not kept
        return found
    return _parse_domain_pattern(pattern)


def _parse_domain_pattern(pattern: str) -> tuple[bool, str]:
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    if "*" in name:
        raise ValueError(f"{pattern!r} is not a domain ('*' is only allowed as a leading '*.')")
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError(f"{pattern!r} is not a domain")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:
        try:
            address = ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError(f"{pattern!r} is not a domain or an IPv6 address") from None
        if wildcard:
            raise ValueError(f"{pattern!r}: an IP address cannot have a '*.' wildcard")
        return False, str(address)
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"{pattern!r} is not a valid international domain name ({e})") from None
    name = name.lower()
    if len(name) > _MAX_NAME:
        raise ValueError(f"{pattern!r} is longer than {_MAX_NAME} characters")
    if _NAME.match(name) is None:  # one match for the whole name; label by label for the message
        for label in name.split("."):
            if not _LABEL.match(label):
                raise ValueError(f"{pattern!r} is not a domain (bad label {label!r})")
    if name.rpartition(".")[2].isdigit():
        # Top-level domains are never all digits: this is meant as an IPv4 address.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f"{pattern!r} is neither a domain nor an IPv4 address") from None
        if wildcard:
            raise ValueError(f"{pattern!r}: an IP address cannot have a '*.' wildcard")
    return wildcard, name


def normalise_host(host: str) -> str:
    """The form a request's host is compared in: lower-case, no trailing dot, no IPv6 brackets."""
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_ip_literal(host: str) -> bool:
    """True for a normalised IPv4 or IPv6 literal (which has no parent domains)."""
    return ":" in host or (host[-1:].isdigit() and host.replace(".", "").isdigit())


def suffixes(host: str) -> list[str]:
    """The host and each parent domain, most specific first: a.b.com -> [a.b.com, b.com, com]."""
    if not host or is_ip_literal(host):
        return [host]
    chain = [host]
    start = host.find(".")
    while start != -1:
        chain.append(host[start + 1 :])
        start = host.find(".", start + 1)
    return chain


__all__ = ["domain_memo", "is_ip_literal", "normalise_host", "parse_domain_pattern", "suffixes"]
