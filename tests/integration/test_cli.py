"""`twistd safesquid` as an operator runs it: help, option errors, start with no options, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# twistd ends a run stopped by a signal by re-raising that signal on itself once the reactor
# has shut down cleanly, so a graceful SIGTERM stop shows as -SIGTERM (or 0).
GRACEFUL_EXIT = (0, -signal.SIGTERM)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_help_lists_every_option(tmp_path):
    from safesquid_tw import tap

    result = harness.run_twistd(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [p[0] for p in tap.Options.optParameters] + [f[0] for f in getattr(tap.Options, "optFlags", [])]
    assert len(names) >= 20
    for name in names:
        assert f"--{name}" in result.stdout, f"--{name} missing from --help"
    # the documented ones, whatever the code's list says
    for name in ("role", "listen", "portal", "state-dir", "policy", "master", "head-timeout", "idle-timeout",
                 "max-request-body", "max-connections", "max-request-line", "max-header-bytes",
                 "response-timeout", "tunnel-idle-timeout", "log-rotate-bytes"):
        assert f"--{name}" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--role", "slave"], "a slave needs --master"),
        (["--master", "10.0.0.1:8888"], "--master is for slaves only"),
        (["--listen", "bogus:endpoint"], "--listen: 'bogus:endpoint' is not a server endpoint"),
        (["--portal", "tcp:not-a-port"], "--portal: 'tcp:not-a-port' is not a server endpoint"),
        (["--role", "gateway"], "--role must be one of"),
    ],
    ids=["slave-without-master", "master-on-standalone", "bad-listen", "bad-portal", "unknown-role"],
)
def test_bad_options_fail_with_one_clear_line(tmp_path, args, expected):
    result = harness.run_twistd(args, cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert expected in last_line(result)
    assert output.count(expected) == 1
    assert not (tmp_path / "safesquid-state").exists(), "a refused start must not create state"


def test_invalid_policy_is_refused_naming_section_and_field(tmp_path):
    policy = harness.make_policy(rules=[{"name": "typo-rule", "action": "deny", "domains": ["*."]}])
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    result = harness.run_twistd(["--policy", str(path), "--listen", "tcp:0:interface=127.0.0.2",
                                 "--portal", "tcp:0:interface=127.0.0.2"], cwd=tmp_path)
    assert result.returncode != 0
    line = last_line(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert "access.rules[0]" in line and "domains[0]" in line, line


def test_unknown_policy_key_is_refused(tmp_path):
    policy = harness.make_policy()
    policy["acess"] = {}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    result = harness.run_twistd(["--policy", str(path)], cwd=tmp_path)
    assert result.returncode != 0
    assert "acess" in last_line(result)


def test_start_with_no_options_creates_private_state(tmp_path):
    for port in (8080, 8888):
        if not harness.port_is_free(port):
            pytest.skip(f"port {port} is in use on this machine; the no-option start needs 8080 and 8888")
    out = open(tmp_path / "twistd.out", "wb")
    process = subprocess.Popen([*harness.twistd_command(), "-n", "safesquid"], cwd=tmp_path,
                               env=harness.node_environment(), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    try:
        state = tmp_path / "safesquid-state"
        listening = state / "run" / "listening.json"

        def started():
            assert process.poll() is None, (tmp_path / "twistd.out").read_text(errors="replace")[-3000:]
            return listening.exists()

        harness.wait_until(started, 30, "safesquid-state/run/listening.json")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        addresses = json.loads(listening.read_text())
        assert addresses["proxy"].endswith(":8080")
        assert addresses["portal"].endswith(":8888")

        def healthy():
            try:
                return harness.raw_request(("127.0.0.1", 8888), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                                           timeout=3, close_wait=0).status == 200
            except OSError:
                return False

        harness.wait_until(healthy, 30, "GET /health on port 8888")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode in GRACEFUL_EXIT, (tmp_path / "twistd.out").read_text(errors="replace")[-3000:]
    assert "Server Shut Down" in (tmp_path / "twistd.out").read_text(errors="replace")


def test_sigterm_stops_gracefully_and_frees_the_ports(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy())
    proxy = node.proxy
    response = harness.proxy_request(node, "GET", origins.url("/before-stop"))
    assert response.status == 200
    started = time.monotonic()
    node.signal(signal.SIGTERM)
    node.process.wait(15)
    assert node.process.returncode in GRACEFUL_EXIT
    assert "Server Shut Down" in node.twistd_log.read_text(errors="replace")
    assert time.monotonic() - started < 10
    with pytest.raises(OSError):
        harness.raw_request(proxy, b"GET / HTTP/1.1\r\n\r\n", timeout=2)
    assert not os.path.exists(f"/proc/{node.pid}")


def test_an_address_already_taken_stops_the_node_with_an_error(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.2", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        result = harness.run_twistd(
            ["--listen", f"tcp:{port}:interface=127.0.0.2", "--portal", "tcp:0:interface=127.0.0.2",
             "--state-dir", str(tmp_path / "state"), "--stop-grace", "0"],
            cwd=tmp_path, timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode != 0  # a supervisor must see a failure, not a clean stop
    assert "cannot listen" in result.stdout and "Address already in use" in result.stdout
