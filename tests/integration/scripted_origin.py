"""A loopback origin that plays a script on each connection: for faults no well-behaved server makes
(bodies cut short, resets mid-body, 1xx floods, bytes after a HEAD answer, half-closes).

    origin = ScriptedOrigin(handler)   # handler(conn: OriginConn) runs in a thread per connection
    origin.port; origin.connections (count); origin.stop()
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Callable

HOST = "127.0.0.1"


class OriginConn:
    def __init__(self, sock: socket.socket, serial: int) -> None:
        self.sock = sock
        self.serial = serial
        self.buffer = b""
        sock.settimeout(20)

    def read_head(self) -> bytes:
        """The next request head (without its blank line); b"" when the proxy closed."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.recv()
            if not chunk:
                return b""
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 16)
        except (ConnectionResetError, socket.timeout):
            return b""

    def read_until_eof(self) -> int:
        """Bytes until the proxy shuts down its sending half (or closes)."""
        total = len(self.buffer)
        self.buffer = b""
        while True:
            chunk = self.recv()
            if not chunk:
                return total
            total += len(chunk)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def closed_by_peer(self, timeout: float) -> bool:
        """Whether the proxy closes this connection within `timeout` (bytes meanwhile ignored)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False


class ScriptedOrigin:
    def __init__(self, handler: Callable[[OriginConn], None]) -> None:
        self.handler = handler
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.events: list[str] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"

    @property
    def authority(self) -> str:
        return f"{HOST}:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(OriginConn(sock, self.connections),), daemon=True).start()

    def _run(self, conn: OriginConn) -> None:
        try:
            self.handler(conn)
        except Exception as e:  # recorded for the test's assertion messages
            self.events.append(f"handler error: {e!r}")
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped = True
        self.listener.close()
