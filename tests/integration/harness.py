"""Run real safesquid-tw nodes (`twistd -n safesquid`) and talk to them over loopback.

Everything here blocks with a deadline: nodes are waited for by polling their files and their
`/health`, never with fixed sleeps, and every socket read has a timeout.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_HOST = "127.0.0.2"
POLICY_FORMAT = "safesquid-policy/1"

_live_nodes: list["Node"] = []


class HarnessError(AssertionError):
    """The node or the traffic did not behave in time (raised as an assertion failure)."""


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


def make_policy(rules: Iterable[dict] = (), default_action: str = "allow", **sections) -> dict:
    """A policy document (docs/policy-format.md) with the given access rules and sections."""
    document = {"format": POLICY_FORMAT, "access": {"default_action": default_action, "rules": list(rules)}}
    document.update(sections)
    return document


def write_json_atomically(path: Path, document: dict | str) -> None:
    text = document if isinstance(document, str) else json.dumps(document, indent=2)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# twistd
# --------------------------------------------------------------------------------------------


def twistd_command() -> list[str]:
    """The twistd of the Python running the tests."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def node_environment() -> dict[str, str]:
    """Environment that makes twistd use this source tree's package and plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_twistd(args: list[str], cwd: Path, timeout: float = 30.0,
               twistd_args: Iterable[str] = ("-n", "--pidfile=")) -> subprocess.CompletedProcess:
    """Run `twistd [twistd_args] safesquid ARGS` to completion (for option errors and --help)."""
    return subprocess.run([*twistd_command(), *twistd_args, "safesquid", *args], cwd=cwd,
                          env=node_environment(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def read_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmRSS for pid {pid}")


class Node:
    """One running `twistd -n safesquid` process and its state directory."""

    def __init__(self, process: subprocess.Popen, state_dir: Path, policy_path: Path | None,
                 args: list[str], name: str) -> None:
        self.process = process
        self.state_dir = state_dir
        self.policy_path = policy_path
        self.args = args
        self.name = name
        self.proxy: tuple[str, int] | None = None
        self.portal: tuple[str, int] | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy[0]}:{self.proxy[1]}"

    @property
    def portal_url(self) -> str:
        return f"http://{self.portal[0]}:{self.portal[1]}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def access_log(self) -> Path:
        return self.logs_dir / "access.log"

    @property
    def extended_log(self) -> Path:
        return self.logs_dir / "extended.log"

    @property
    def twistd_log(self) -> Path:
        return self.state_dir / "twistd.log"

    # -- life cycle --------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        listening = self.state_dir / "run" / "listening.json"

        def addresses():
            self._fail_if_exited("while starting")
            try:
                return json.loads(listening.read_text())
            except (OSError, ValueError):
                return None

        found = wait_until(addresses, timeout, f"{listening} of node {self.name}")
        self.proxy = _parse_hostport(found["proxy"])
        self.portal = _parse_hostport(found["portal"])

        def healthy():
            self._fail_if_exited("while starting")
            try:
                return self.health()[0] == 200
            except OSError:
                return False

        wait_until(healthy, timeout, f"GET /health = 200 on node {self.name}", interval=0.1)

    def _fail_if_exited(self, when: str) -> None:
        if self.process.poll() is not None:
            raise HarnessError(f"node {self.name} exited with {self.process.returncode} {when}\n"
                               + self.log_tails())

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if the node has not stopped within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self in _live_nodes:
            _live_nodes.remove(self)
        return self.process.returncode

    def signal(self, signum: int) -> None:
        self._fail_if_exited("before a signal")
        os.kill(self.pid, signum)

    def write_policy(self, document: dict | str) -> None:
        assert self.policy_path is not None, "node was started without --policy"
        write_json_atomically(self.policy_path, document)

    def reload(self, document: dict | str | None = None) -> None:
        """Optionally rewrite the policy file, then SIGHUP the node."""
        if document is not None:
            self.write_policy(document)
        self.signal(signal.SIGHUP)

    def rss_bytes(self) -> int:
        return read_rss_bytes(self.pid)

    # -- portal ------------------------------------------------------------------------------

    def health(self, timeout: float = 3.0) -> tuple[int, dict | None]:
        conn = http.client.HTTPConnection(*self.portal, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        return response.status, document

    # -- logs --------------------------------------------------------------------------------

    def access_records(self) -> list[dict]:
        """Every complete JSON line of the current access.log."""
        try:
            raw = self.access_log.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        for line in raw.split(b"\n")[:-1]:  # the last piece is empty or a line being written
            if line.strip():
                records.append(json.loads(line))
        return records

    def wait_for_access(self, predicate: Callable[[dict], bool], timeout: float = 5.0,
                        what: str = "an access record") -> dict:
        def find():
            for record in reversed(self.access_records()):
                if predicate(record):
                    return record
            return None

        try:
            return wait_until(find, timeout, what, interval=0.05)
        except HarnessError as e:
            tail = "\n".join(json.dumps(r) for r in self.access_records()[-10:])
            raise HarnessError(f"{e}\nlast access records:\n{tail}") from None

    def wait_for_url(self, fragment: str, timeout: float = 5.0) -> dict:
        """The newest access record whose url contains `fragment`."""
        return self.wait_for_access(lambda r: fragment in str(r.get("url", "")), timeout,
                                    f"an access record with {fragment!r} in its url")

    def extended_text(self) -> str:
        try:
            return self.extended_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def extended_mark(self) -> int:
        """Current size of extended.log: pass it as `since` to look only at newer lines."""
        try:
            return self.extended_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_extended(self, predicate: Callable[[str], bool], timeout: float = 5.0,
                          since: int = 0, what: str = "an extended.log line") -> str:
        def find():
            try:
                with open(self.extended_log, "rb") as f:
                    f.seek(since)
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                return None
            for line in text.splitlines():
                if predicate(line):
                    return line
            return None

        try:
            return wait_until(find, timeout, what, interval=0.05)
        except HarnessError as e:
            raise HarnessError(f"{e}\nextended.log tail:\n{_tail(self.extended_log, 20)}") from None

    def log_tails(self, lines: int = 40) -> str:
        status = "running" if self.alive() else f"exited with {self.process.returncode}"
        parts = [f"===== node {self.name} (pid {self.pid}, {status}) args: {' '.join(self.args)}"]
        for path in (self.state_dir / "twistd.out", self.twistd_log, self.extended_log, self.access_log):
            parts.append(f"----- {path.name} (last {lines} lines)\n{_tail(path, lines)}")
        return "\n".join(parts)


def _parse_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def start_node(workdir: Path, *, policy: dict | str | None = None, args: Iterable[str] = (),
               name: str = "node", host: str = NODE_HOST, wait: bool = True,
               timeout: float = 30.0) -> Node:
    """Start `twistd -n safesquid` with its state in workdir/<name>-state.

    `policy` (a document or raw text) is written to workdir/<name>-policy.json and passed as
    --policy. The proxy and the portal listen on port 0 of `host`.
    """
    state_dir = workdir / f"{name}-state"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    policy_path = None
    argv = [
        "--listen", f"tcp:0:interface={host}",
        "--portal", f"tcp:0:interface={host}",
        "--state-dir", str(state_dir),
    ]
    if policy is not None:
        policy_path = workdir / f"{name}-policy.json"
        write_json_atomically(policy_path, policy)
        argv += ["--policy", str(policy_path)]
    argv += list(args)
    out = open(state_dir / "twistd.out", "wb")
    process = subprocess.Popen(
        [*twistd_command(), "-n", "--pidfile=", f"--logfile={state_dir / 'twistd.log'}", "safesquid", *argv],
        cwd=state_dir, env=node_environment(), stdout=out, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    out.close()
    node = Node(process, state_dir, policy_path, argv, name)
    _live_nodes.append(node)
    if wait:
        try:
            node.wait_ready(timeout)
        except BaseException:
            print(node.log_tails())
            node.stop()
            raise
    return node


def live_nodes() -> list[Node]:
    return list(_live_nodes)


@atexit.register
def _kill_leftover_nodes() -> None:
    for node in list(_live_nodes):
        if node.process.poll() is None:
            node.process.kill()


# --------------------------------------------------------------------------------------------
# Raw HTTP/1.1 over sockets
# --------------------------------------------------------------------------------------------


class RawResponse(NamedTuple):
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


def proxy_request(node: Node, method: str, url: str, headers: Iterable[tuple[str, str]] = (),
                  body: bytes | None = None, version: str = "HTTP/1.1", timeout: float = 15.0) -> RawResponse:
    """One absolute-form request through the node's proxy on a fresh connection."""
    return raw_request(node.proxy, build_request(method, url, headers, body, version), timeout=timeout,
                       close_wait=0.0, head_request=method == "HEAD")


def basic_credentials(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on `host` with nothing listening (connections to it are refused)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
