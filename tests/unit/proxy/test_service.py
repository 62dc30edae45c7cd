import pytest

from safesquid_tw.proxy.service import with_backlog


@pytest.mark.parametrize(
    "given, used",
    [
        ("tcp:8080", "tcp:8080:backlog=1024"),
        ("tcp:8080:interface=127.0.0.2", "tcp:8080:interface=127.0.0.2:backlog=1024"),
        ("tcp6:3128:interface=\\:\\:1", "tcp6:3128:interface=\\:\\:1:backlog=1024"),
        ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),
        ("unix:/run/proxy.sock", "unix:/run/proxy.sock"),
    ],
)
def test_tcp_endpoints_get_a_proxy_sized_backlog(given, used):
    assert with_backlog(given) == used
