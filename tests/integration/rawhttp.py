"""A strict little HTTP/1.1 client for the tests: exact bytes out, parsed responses back.

Every read has a deadline. Responses are parsed by their framing (Content-Length, chunked, or
until close), so the tests can tell a complete response from one cut short, and a closed
connection from one kept alive.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
from typing import Iterable, NamedTuple
from urllib.parse import urlsplit


class HarnessError(AssertionError):
    """The node or the traffic did not behave in time (raised as an assertion failure)."""


class RawResponse(NamedTuple):
    """One response: unpacks as (status, headers, body, closed)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return ", ".join(values) if values else None

    def has_header(self, name: str) -> bool:
        return bool(self.header_values(name))

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class IncompleteResponse(HarnessError):
    """The peer closed the connection before the response was complete."""

    def __init__(self, message: str, status: int | None, headers: list, body: bytes) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = body


class RawConnection:
    """A client socket that sends exact bytes and parses the responses that come back."""

    def __init__(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buffer = bytearray()
        self.eof = False

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on EOF or reset."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HarnessError(f"no complete response from {self.addr} in time; got {bytes(self.buffer[:300])!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout:
            raise HarnessError(f"no complete response from {self.addr} in time; got {bytes(self.buffer[:300])!r}")
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def read_some(self, timeout: float | None = None) -> bytes:
        """Whatever bytes arrive next (for tunnels); b'' on EOF."""
        if not self.buffer:
            deadline = time.monotonic() + (timeout or self.timeout)
            self._fill(deadline)
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def read_exactly(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buffer) < n:
            if not self._fill(deadline):
                raise IncompleteResponse(f"closed after {len(self.buffer)} of {n} bytes", None, [],
                                         bytes(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def _read_line(self, deadline: float) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if not self._fill(deadline):
                raise IncompleteResponse("connection closed inside a line", None, [], bytes(self.buffer))

    def read_head(self, timeout: float | None = None) -> tuple[int, list[tuple[str, str]]]:
        """Status and headers of the next response (an interim 1xx one included)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill(deadline):
                raise IncompleteResponse(f"connection closed before a response head; got {bytes(self.buffer)!r}",
                                         None, [], bytes(self.buffer))
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HarnessError(f"not an HTTP status line: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HarnessError(f"malformed response header line {line!r}")
            headers.append((name, value.strip()))
        return int(parts[1]), headers

    def read_response(self, timeout: float | None = None, head_request: bool = False,
                      close_wait: float = 0.0, skip_interim: bool = True,
                      max_body: int = 64 << 20) -> RawResponse:
        """Read one response. `closed` is True when the peer closed the connection after it
        (waiting up to `close_wait` seconds to find out)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            status, headers = self.read_head(max(deadline - time.monotonic(), 0.001))
            if not (skip_interim and 100 <= status < 200 and status != 101):
                break
        values = {n.lower(): v for n, v in headers}
        body = bytearray()
        if head_request or 100 <= status < 200 or status in (204, 304):
            pass
        elif "chunked" in values.get("transfer-encoding", "").lower():
            body = self._read_chunked(deadline, status, headers, max_body)
        elif "content-length" in values:
            length = int(values["content-length"])
            while len(self.buffer) < length:
                if not self._fill(deadline):
                    raise IncompleteResponse(f"closed after {len(self.buffer)} of {length} body bytes",
                                             status, headers, bytes(self.buffer))
            body = self.buffer[:length]
            del self.buffer[:length]
        else:
            while self._fill(deadline):
                if len(self.buffer) > max_body:
                    raise HarnessError("close-delimited body larger than expected")
            body, self.buffer = self.buffer, bytearray()
        closed = self.eof or (close_wait > 0 and self.wait_closed(close_wait) is not None)
        return RawResponse(status, headers, bytes(body), closed)

    def _read_chunked(self, deadline: float, status: int, headers: list, max_body: int) -> bytearray:
        body = bytearray()
        try:
            while True:
                size_line = self._read_line(deadline)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self._read_line(deadline):  # trailers, up to the empty line
                        pass
                    return body
                while len(self.buffer) < size + 2:
                    if not self._fill(deadline):
                        raise IncompleteResponse("closed inside a chunk", status, headers, b"")
                body += self.buffer[:size]
                if self.buffer[size:size + 2] != b"\r\n":
                    raise HarnessError("chunk not followed by CRLF")
                del self.buffer[: size + 2]
                if len(body) > max_body:
                    raise HarnessError("chunked body larger than expected")
        except IncompleteResponse as e:
            # What arrived of the chunk being read counts as received body.
            raise IncompleteResponse(str(e), status, headers, bytes(body + self.buffer)) from None

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds until the peer closed the connection, or None if still open after `timeout`.
        Bytes that arrive meanwhile are kept in the buffer."""
        start = time.monotonic()
        deadline = start + timeout
        while not self.eof:
            if time.monotonic() >= deadline:
                return None
            try:
                self._fill(deadline)
            except HarnessError:
                return None
        return time.monotonic() - start


def build_request(method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None,
                  version: str = "HTTP/1.1", host: str | None = None) -> bytes:
    """Request bytes. A Host header is added from an absolute-form target unless one is given,
    and Content-Length for a body unless a framing header is given."""
    headers = list(headers)
    names = {n.lower() for n, _ in headers}
    if "host" not in names and host is None and "://" in target:
        host = urlsplit(target).netloc.rpartition("@")[2]
    if "host" not in names and host is not None:
        headers.insert(0, ("Host", host))
    if body is not None and not names & {"content-length", "transfer-encoding"}:
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def raw_request(addr: tuple[str, int], data: bytes, timeout: float = 10.0, close_wait: float = 1.0,
                head_request: bool = False) -> RawResponse:
    """Send exact bytes on a new connection and read one response: (status, headers, body, closed)."""
    with RawConnection(addr, timeout) as conn:
        conn.send(data)
        return conn.read_response(timeout=timeout, close_wait=close_wait, head_request=head_request)


def basic_credentials(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on `host` with nothing listening (connections to it are refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]



def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed (or reset) `sock`, None if it is still open after `timeout`.

    Whatever the peer sends meanwhile is read and dropped: only the close counts.
    """
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return None
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
    return None

def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def echo_headers(echo: dict, name: str) -> list[str]:
    """Values of a request header as the echo origin received it."""
    name = name.lower()
    return [v for n, v in echo["headers"] if n.lower() == name]


# --------------------------------------------------------------------------------------------
# curl
# --------------------------------------------------------------------------------------------


class CurlResult(NamedTuple):
    returncode: int
    status: int
    body: bytes
    seconds: float
    stderr: str

    def json(self):
        return json.loads(self.body)


def curl(*args: str, timeout: float = 30.0) -> CurlResult:
    """Run curl with the given arguments; the body is what it printed, the status its HTTP code."""
    import shutil

    import pytest

    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (scripts/test installs it)")
    result = subprocess.run(
        [exe, "-sS", "--max-time", str(timeout), "-w", "%{stderr}\nCURLSTATUS %{http_code} %{time_total}\n", *args],
        capture_output=True, timeout=timeout + 10, stdin=subprocess.DEVNULL,
    )
    stderr = result.stderr.decode(errors="replace")
    status, seconds = 0, 0.0
    for line in stderr.splitlines():
        if line.startswith("CURLSTATUS "):
            _, code, total = line.split()
            status, seconds = int(code), float(total.replace(",", "."))
    return CurlResult(result.returncode, status, result.stdout, seconds, stderr)
