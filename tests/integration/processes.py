"""The servers the tests start: free loopback ports for them and a stop that always ends them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening on `host` right now (the server binds it moments later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited within `timeout`.

    With `group`, the signals go to the process group `process` leads (a server started with
    `start_new_session=True` that forks helpers of its own: c-icap, slapd, a KDC).
    """
    if process is None or process.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)

    try:
        send(signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            send(signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout)
