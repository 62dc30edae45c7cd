"""Run real safesquid-tw nodes (`twistd -n safesquid`) and talk to them over loopback.

Everything here blocks with a deadline: nodes are waited for by polling their files and their
`/health`, never with fixed sleeps, and every socket read has a timeout.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from processes import stop_process

from rawhttp import (
    CurlResult,
    HarnessError,
    IncompleteResponse,
    RawConnection,
    RawResponse,
    basic_credentials,
    build_request,
    closed_port,
    curl,
    echo_headers,
    port_is_free,
    raw_request,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_HOST = "127.0.0.2"
POLICY_FORMAT = "safesquid-policy/1"

_live_nodes: list["Node"] = []


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


def fetch_health(portal: tuple[str, int], timeout: float) -> tuple[int, dict | None]:
    """GET /health from a node's portal: the status code and the JSON body (None if not JSON)."""
    conn = http.client.HTTPConnection(*portal, timeout=timeout)
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


class ExtendedLogReader:
    """Reading a node's extended.log (the class provides its path as `extended_log`)."""

    extended_log: Path

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


class Node(ExtendedLogReader):
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
        stop_process(self.process, timeout)
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
        return fetch_health(self.portal, timeout)

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
               timeout: float = 30.0, env: dict[str, str] | None = None) -> Node:
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
    if not any(a.startswith("--stop-grace") for a in argv):
        # Tests stop nodes all the time; the load-balancer test sets its own grace.
        argv += ["--stop-grace", "0"]
    out = open(state_dir / "twistd.out", "wb")
    process = subprocess.Popen(
        [*twistd_command(), "-n", "--pidfile=", f"--logfile={state_dir / 'twistd.log'}", "safesquid", *argv],
        cwd=state_dir, env={**node_environment(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
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


def proxy_request(node: Node, method: str, url: str, headers: Iterable[tuple[str, str]] = (),
                  body: bytes | None = None, version: str = "HTTP/1.1", timeout: float = 15.0) -> RawResponse:
    """One absolute-form request through the node's proxy on a fresh connection."""
    return raw_request(node.proxy, build_request(method, url, headers, body, version), timeout=timeout,
                       close_wait=0.0, head_request=method == "HEAD")


def assert_blocked(response: RawResponse, rule: str, reason: str | None = None) -> None:
    """The response is the node's HTML block page naming `rule` (and its `reason`)."""
    assert response.status == 403, f"expected the block page of {rule}, got {response.status}: {response.text[:300]}"
    assert "text/html" in (response.header("content-type") or ""), response.headers
    assert rule in response.text, f"the block page does not name the rule {rule}"
    if reason:
        assert reason in response.text, "the block page does not give the rule's reason"


def assert_passed(response: RawResponse) -> dict:
    """The request went through: the echo origin answered. Returns its echo document."""
    assert response.status == 200, f"expected the origin's answer, got {response.status}: {response.text[:300]}"
    return response.json()


__all__ = [
    # nodes
    "NODE_HOST", "Node", "start_node", "live_nodes", "run_twistd", "twistd_command", "node_environment",
    "make_policy", "write_json_atomically", "wait_until", "read_rss_bytes",
    # traffic (from rawhttp, so a test needs one import)
    "CurlResult", "HarnessError", "IncompleteResponse", "RawConnection", "RawResponse", "basic_credentials",
    "build_request", "closed_port", "curl", "echo_headers", "port_is_free", "raw_request", "proxy_request",
    "assert_blocked", "assert_passed",
]
