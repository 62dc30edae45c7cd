"""Host names: the domain patterns a policy lists and the hosts requests name.

A pattern is `example.com` (that host only) or `*.example.com` (every subdomain and
`example.com` itself). Both sides are compared lower-cased, without a trailing dot, with
international names in their ASCII (punycode) form, which is what clients put on the wire.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_MAX_NAME = 253


def parse_domain_pattern(pattern: str) -> tuple[bool, str]:
    """Split a policy domain pattern into (wildcard, normalised domain).

    Raises ValueError with a message fit for an administrator when the pattern is not a domain.
    """
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
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"{pattern!r} is not a domain (bad label {label!r})")
    if labels[-1].isdigit():
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


__all__ = ["is_ip_literal", "normalise_host", "parse_domain_pattern", "suffixes"]
