"""The portal's Restart button and "join a cluster" on real processes started the way an
operator starts them: twistd with its default pidfile (twistd.pid in the working directory).

The restart stops the node cleanly and runs the same command again in the same process (same
pid, same supervisor), after removing the pidfile that names it; a standalone node that joins
a cluster comes back as a slave that the master lists.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from pathlib import Path

import pytest

import harness
from cluster_harness import ACTIVATION_KEY, cluster  # noqa: F401 - fixture
from harness import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST = "127.0.0.9"


class Browser:
    """Just enough of a browser for the portal over plain HTTP on loopback: cookies and CSRF."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(self, method: str, path: str, fields: dict[str, str] | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection(*self.address, timeout=15)
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if fields is not None:
            from urllib.parse import urlencode

            body = urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
            for value in response.headers.get_all("Set-Cookie") or []:
                name, _, rest = value.partition("=")
                self.cookies[name] = rest.split(";", 1)[0]
            return response.status, text
        finally:
            conn.close()

    def login(self, password: str) -> None:
        _status, page = self.request("GET", "/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)
        status, _ = self.request("POST", "/login", {"name": "admin", "password": password, "login_token": token})
        assert status == 303
        _status, home = self.request("GET", "/")
        self.csrf = re.search(r'name="csrf" value="([^"]+)"', home).group(1)


def start_with_default_pidfile(workdir: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    state = workdir / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    out = open(workdir / "twistd.out", "wb")
    process = subprocess.Popen(
        [*harness.twistd_command(), "-n", f"--logfile={workdir / 'twistd.log'}", "safesquid",
         "--state-dir", str(state), "--listen", f"tcp:0:interface={HOST}", "--portal", f"tcp:0:interface={HOST}",
         "--stop-grace", "0", *args],
        cwd=workdir, env=harness.node_environment(), stdout=out, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    return process, state


def wait_listening(process: subprocess.Popen, state: Path, previous: dict | None = None) -> dict:
    path = state / "run" / "listening.json"

    def found():
        assert process.poll() is None, (state.parent / "twistd.out").read_text(errors="replace")[-3000:]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data != previous or previous is None else None

    return wait_until(found, 30, "listening.json")


def portal_of(listening: dict) -> tuple[str, int]:
    host, _, port = listening["portal"].rpartition(":")
    return host.strip("[]"), int(port)


def health(address: tuple[str, int]) -> dict | None:
    try:
        conn = http.client.HTTPConnection(*address, timeout=3)
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return json.loads(body) if response.status == 200 else None
    except (OSError, ValueError):
        return None


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_restart_button_works_with_twistds_default_pidfile(tmp_path):
    process, state = start_with_default_pidfile(tmp_path, ["--policy", str(_policy(tmp_path))])
    try:
        first = wait_listening(process, state)
        pidfile = tmp_path / "twistd.pid"
        assert int(pidfile.read_text()) == process.pid
        browser = Browser(portal_of(first))
        browser.login((state / "admin-password").read_text().strip())
        # The listening file goes away at the clean stop and comes back once the ports are bound.
        status, page = browser.request("POST", "/node/restart", {"csrf": browser.csrf})
        assert status == 200 and "Restarting" in page
        wait_until(lambda: not (state / "run" / "listening.json").exists() or process.poll() is not None, 30,
                   "the clean stop")
        again = wait_listening(process, state)
        assert process.poll() is None, "the node stayed down"
        assert int(pidfile.read_text()) == process.pid  # same process, pidfile written again
        wait_until(lambda: health(portal_of(again)), 30, "/health after the restart")
        assert "Another twistd server is running" not in (tmp_path / "twistd.out").read_text(errors="replace")
    finally:
        stop(process)


def _policy(workdir: Path) -> Path:
    path = workdir / "policy.json"
    harness.write_json_atomically(path, harness.make_policy())
    return path


def test_a_standalone_node_joins_a_cluster_from_its_portal(tmp_path, cluster):  # noqa: F811
    master = cluster.start_master(harness.make_policy(rules=[
        {"name": "from-master", "action": "deny", "domains": ["master-rule.invalid"]}]))
    workdir = tmp_path / "joiner"
    workdir.mkdir()
    process, state = start_with_default_pidfile(workdir, ["--policy", str(_policy(workdir)), "--node-name", "joiner"])
    try:
        first = wait_listening(process, state)
        browser = Browser(portal_of(first))
        browser.login((state / "admin-password").read_text().strip())
        status, page = browser.request("GET", "/node/startup")
        assert status == 200 and "Join a cluster as a slave" in page
        status, page = browser.request("POST", "/node/join", {
            "csrf": browser.csrf, "master": cluster.master_address, "activation_key": "",
            "node_name": "joiner"})
        assert status == 422 and "activation key is needed" in page  # refused, nothing saved
        assert not (state / "startup.json").exists()
        status, page = browser.request("POST", "/node/join", {
            "csrf": browser.csrf, "master": cluster.master_address, "activation_key": ACTIVATION_KEY,
            "node_name": "joiner", "restart": "on"})
        assert status == 200 and "slave of" in page
        saved = json.loads((state / "startup.json").read_text())
        assert saved["role"] == "slave" and saved["master"] == cluster.master_address
        assert (state / "activation-key").stat().st_mode & 0o077 == 0
        wait_until(lambda: (cluster.node_view("joiner") or {}).get("connected"), 30, "the master lists joiner")
        assert process.poll() is None
        again = json.loads((state / "run" / "listening.json").read_text())
        body = wait_until(lambda: health(portal_of(again)), 30, "/health of the slave")
        assert body.get("role", "slave") == "slave"
        assert master.alive()
    finally:
        stop(process)
