"""This host's own IP addresses, for the master's certificate to name.

Found without name lookups: loopback, the address of every interface (Linux ioctl and
``/proc``), and the source address the kernel would pick for the default routes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

_SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of one interface
_ROUTE_PROBES = (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6))  # documentation nets


def _interface_ipv4_addresses() -> set[str]:
    found: set[str] = set()
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface, or not Linux
                continue
            found.add(socket.inet_ntoa(raw[20:24]))
    return found


def _interface_ipv6_addresses() -> set[str]:
    found: set[str] = set()
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        try:
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
        except (IndexError, ValueError):
            continue
    return found


def _routed_addresses() -> set[str]:
    # Connecting a UDP socket sends nothing: the kernel only picks the source address it would use.
    found: set[str] = set()
    for probe, family in _ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.add(s.getsockname()[0])
        except OSError:
            continue
    return found


def local_addresses() -> list[str]:
    """This host's IP addresses, found without name lookups: loopback, every interface's
    (Linux), and the source address of the default routes. Link-local ones are left out (a
    certificate cannot name their scope)."""
    candidates = {"127.0.0.1", "::1"}
    candidates |= _interface_ipv4_addresses() | _interface_ipv6_addresses() | _routed_addresses()
    addresses = []
    for text in candidates:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if not ip.is_link_local and not ip.is_unspecified:
            addresses.append(ip)
    return [str(ip) for ip in sorted(addresses, key=lambda ip: (ip.version, ip))]


__all__ = [
    "local_addresses",
]
