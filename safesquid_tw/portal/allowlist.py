"""The portal's allow list: `access_restriction.portal_allow` of the current policy.

Empty or absent means no restriction. The networks are parsed once per policy version and kept
with its digest, so a request costs one comparison per listed network.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def portal_networks(document: dict[str, Any] | None) -> tuple[Network, ...]:
    section = (document or {}).get("access_restriction") or {}
    return tuple(ipaddress.ip_network(text, strict=False) for text in section.get("portal_allow", ()))


def address_in(address: str, networks: tuple[Network, ...]) -> bool:
    """True when `address` is in one of `networks` (an IPv4-mapped IPv6 address counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class PortalAllowList:
    """Answers "may this address use the portal?" for the store's current policy."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._digest: str | None = None
        self._networks: tuple[Network, ...] = ()

    def networks(self) -> tuple[Network, ...]:
        policy = self._store.current
        if policy is None:
            return ()
        if policy.digest != self._digest:
            self._networks = portal_networks(policy.document)
            self._digest = policy.digest
        return self._networks

    def allows(self, address: str | None) -> bool:
        networks = self.networks()
        if not networks:
            return True
        return address is not None and address_in(address, networks)


__all__ = ["PortalAllowList", "address_in", "portal_networks"]
