"""readable_now: the same answers as a non-blocking MSG_PEEK, over real loopback sockets."""

from __future__ import annotations

import socket

import pytest

from safesquid_tw.proxy.peekready import readable_now


def _peek(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.fixture
def pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.setblocking(False)
    yield client, server
    client.close()
    server.close()


def _wait_readable(sock: socket.socket) -> None:
    import select
    select.select([sock], [], [], 5.0)


def test_idle_connection_is_not_readable(pair):
    client, _server = pair
    assert readable_now(client) is False
    assert _peek(client) is False


def test_waiting_bytes_are_seen_and_left_in_place(pair):
    client, server = pair
    server.sendall(b"HTTP/1.1 200 OK\r\n")
    _wait_readable(client)
    assert readable_now(client) is True
    assert _peek(client) is True
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n"  # nothing was consumed
    assert readable_now(client) is False


def test_end_of_stream_is_seen(pair):
    client, server = pair
    server.close()
    _wait_readable(client)
    assert readable_now(client) is True
    assert _peek(client) is True


def test_reset_is_seen(pair):
    client, server = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()  # linger 0: RST
    _wait_readable(client)
    assert readable_now(client) is True
    assert _peek(client) is True


def test_closed_socket_counts_as_not_reusable():
    sock = socket.socket()
    sock.close()
    assert readable_now(sock) is True


def test_checks_leave_no_registration_behind(pair):
    client, server = pair
    for _ in range(3):
        assert readable_now(client) is False
    server.sendall(b"x")
    _wait_readable(client)
    assert readable_now(client) is True
