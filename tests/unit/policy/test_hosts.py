"""Host names, domain patterns and client addresses as the policy compares them."""

from __future__ import annotations

import pytest

from safesquid_tw.policy.hosts import normalise_host, parse_domain_pattern, suffixes
from safesquid_tw.policy.networks import NetworkMap, parse_address


@pytest.mark.parametrize("pattern, parsed", [
    ("example.com", (False, "example.com")),
    ("*.Example.COM.", (True, "example.com")),
    ("bücher.example", (False, "xn--bcher-kva.example")),
    ("[2001:DB8::1]", (False, "2001:db8::1")),
    ("10.0.0.1", (False, "10.0.0.1")),
    ("_dmarc.example.com", (False, "_dmarc.example.com")),
])
def test_parse_domain_pattern(pattern: str, parsed: tuple[bool, str]) -> None:
    assert parse_domain_pattern(pattern) == parsed


@pytest.mark.parametrize("pattern", ["", "*.", "*", "a.*.com", "-a.com", "a-.com", "a..com", "a b.com", "1.2.3.999",
                                     "*.::1", ":::", "x" * 64 + ".com", ("a." * 127) + "com"])
def test_parse_domain_pattern_refuses(pattern: str) -> None:
    with pytest.raises(ValueError):
        parse_domain_pattern(pattern)


@pytest.mark.parametrize("host, normal, chain", [
    ("WWW.Example.com.", "www.example.com", ["www.example.com", "example.com", "com"]),
    ("[::1]", "::1", ["::1"]),
    ("192.0.2.1", "192.0.2.1", ["192.0.2.1"]),
    ("localhost", "localhost", ["localhost"]),
])
def test_normalise_and_suffixes(host: str, normal: str, chain: list[str]) -> None:
    assert normalise_host(host) == normal
    assert suffixes(normal) == chain


@pytest.mark.parametrize("text, parsed", [
    ("10.1.2.3", (4, 0x0A010203)),
    ("::1", (6, 1)),
    ("[::1]", (6, 1)),
    ("::ffff:10.0.0.1", (4, 0x0A000001)),
    ("fe80::1%eth0", (6, 0xFE80 << 112 | 1)),
    ("01.2.3.4", None),
    ("1.2.3", None),
    ("example.com", None),
    ("", None),
])
def test_parse_address(text: str, parsed: tuple[int, int] | None) -> None:
    assert parse_address(text) == parsed


def test_network_map_ors_every_network_holding_the_address() -> None:
    networks = NetworkMap([("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.3", 4), ("2001:db8::/32", 8),
                           ("0.0.0.0/0", 16)])
    assert networks.lookup("10.1.2.3") == 1 | 2 | 4 | 16
    assert networks.lookup("10.2.0.1") == 1 | 16
    assert networks.lookup("192.0.2.1") == 16
    assert networks.lookup("2001:db8::7") == 8
    assert networks.lookup("2001:db9::7") == 0
    assert networks.lookup("nonsense") == 0
