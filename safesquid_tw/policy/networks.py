"""Client addresses against lists of IP networks, in a few dictionary look-ups.

Networks are grouped by prefix length; an address is shifted once per distinct length and
looked up, so the cost depends on how many different prefix lengths a policy uses, not on how
many networks it lists.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

Address = tuple[int, int]  # (IP version, address as an integer)


def parse_address(text: str) -> Address | None:
    """(IP version, address as an integer), or None when `text` is not an IP address.

    An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack socket reports for an IPv4
    client) counts as the IPv4 address, so IPv4 networks in a policy still apply to it.
    """
    # inet_pton is several times faster than ipaddress and as strict (dotted quad only).
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        pass
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except OSError:
        try:  # scoped addresses (fe80::1%eth0) and anything else ipaddress knows
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
        if address.version == 4:
            return 4, int(address)
        value = int(address)
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


class NetworkMap:
    """Networks that each carry a bit mask; `lookup` ORs the masks of all networks holding an address."""

    __slots__ = ("_levels",)

    def __init__(self, entries: Iterable[tuple[str, int]]) -> None:
        tables: dict[tuple[int, int], dict[int, int]] = {}
        for text, mask in entries:
            network = ipaddress.ip_network(text, strict=True)
            shift = network.max_prefixlen - network.prefixlen
            table = tables.setdefault((network.version, shift), {})
            key = int(network.network_address) >> shift
            table[key] = table.get(key, 0) | mask
        self._levels: dict[int, tuple[tuple[int, dict[int, int]], ...]] = {
            version: tuple((shift, table) for (v, shift), table in sorted(tables.items()) if v == version)
            for version in (4, 6)
        }

    def lookup(self, client_ip: str) -> int:
        return self.lookup_address(parse_address(client_ip))

    def lookup_address(self, parsed: Address | None) -> int:
        if parsed is None:
            return 0
        version, value = parsed
        found = 0
        for shift, table in self._levels[version]:
            found |= table.get(value >> shift, 0)
        return found

    def __bool__(self) -> bool:
        return any(self._levels.values())


class NetworkSet:
    """Plain membership: is an address in any of these networks?"""

    __slots__ = ("_map",)

    def __init__(self, networks: Iterable[str]) -> None:
        self._map = NetworkMap((text, 1) for text in networks)

    def __contains__(self, client_ip: str) -> bool:
        return self._map.lookup(client_ip) != 0

    def contains_address(self, parsed: Address | None) -> bool:
        return self._map.lookup_address(parsed) != 0


__all__ = ["Address", "NetworkMap", "NetworkSet", "parse_address"]
