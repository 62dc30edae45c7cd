"""--listen given more than once, PROXY listeners, --proxy-protocol-from and the edge limits."""

from __future__ import annotations

import pytest
from twisted.python import usage

from safesquid_tw import tap
from safesquid_tw.config import Limits


def parse(argv):
    options = tap.Options()
    options.parseOptions(argv)
    return options.config


def test_one_listener_by_default():
    config = parse([])
    assert config.listen == "tcp:8080" and config.listen_endpoints == ("tcp:8080",)
    assert config.proxy_protocol_from is None
    assert config.limits.max_connections_per_client == 256 and config.limits.first_byte_timeout == 10.0


def test_listen_accumulates_in_order():
    config = parse(["--listen", "haproxy:tcp:3128:interface=127.0.0.2", "--listen", "tcp:8080",
                    "--proxy-protocol-from", "10.0.0.0/8, 192.0.2.7"])
    assert config.listen == "haproxy:tcp:3128:interface=127.0.0.2"
    assert config.listen_endpoints == ("haproxy:tcp:3128:interface=127.0.0.2", "tcp:8080")
    assert config.proxy_protocol_from == "10.0.0.0/8, 192.0.2.7"


def test_edge_limits_are_options():
    config = parse(["--max-connections-per-client", "8", "--first-byte-timeout", "2.5"])
    assert config.limits == Limits(max_connections_per_client=8, first_byte_timeout=2.5)


@pytest.mark.parametrize("argv, message", [
    (["--listen", "tcp:8080", "--listen", "bogus:1"], "--listen: 'bogus:1' is not a server endpoint"),
    (["--proxy-protocol-from", "10.0.0.0/33"], "--proxy-protocol-from: '10.0.0.0/33' is not a network"),
    (["--proxy-protocol-from", ","], "--proxy-protocol-from: no network given"),
    (["--max-connections-per-client", "0"], "--max-connections-per-client must be a positive number"),
    (["--first-byte-timeout", "soon"], "--first-byte-timeout must be a number"),
])
def test_bad_values_name_the_option(argv, message):
    with pytest.raises((usage.UsageError, ValueError)) as caught:
        parse(argv)
    assert message in str(caught.value)
