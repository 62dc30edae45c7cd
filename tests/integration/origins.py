"""Origin servers for the integration tests, run as one subprocess on 127.0.0.1.

The test process starts them with `start_origins(workdir)` and reads their ports from the
`Origins` handle. Running them in a process of their own keeps them independent of how a
test is written (blocking sockets, curl, or pytest-twisted) and keeps their memory out of the
node's RSS measurements.

Servers (each on port 0 of 127.0.0.1):

- ``http``: an HTTP/1.1 origin (h11 on Twisted), keep-alive aware, answering 100-continue.
  Every response names the connection it came on (``conn``), so pooling can be asserted.
  Paths select a behaviour:

  - any path not listed: echo of the request as JSON (method, target, version, headers in
    arrival order, body length and sha256, the body itself when small, conn, req_on_conn,
    expect_100, sent_100, body_before_100);
  - ``/large?bytes=N[&chunked=1][&ctype=T]``: N bytes made on the fly, written under
    back-pressure (an IPushProducer), never held in memory;
  - ``/chunked?chunks=K&size=S[&interval=SEC]``: a chunked response, one chunk per write;
  - ``/trickle?chunks=K&size=S&interval=SEC``: a Content-Length body written in K pieces;
  - ``/slow?delay=SEC``: the echo, after holding back the whole response for SEC seconds;
  - ``/respond?status=N&ctype=T&h=Name:Value&body=TEXT|size=N[&cl=0]``: a response with
    the given status, headers and body (``cl=0``: no Content-Length, so chunked).
- ``http2``: a second, independent echo origin (another port, e.g. for port rules).
- ``tls``: the same HTTP origin behind TLS with a self-signed certificate made at start-up.
- ``ws``: answers ``101 Switching Protocols`` to ``Upgrade: websocket`` and then echoes raw bytes.
- ``silent``: accepts connections, reads everything and never answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from processes import stop_process

ORIGIN_HOST = "127.0.0.1"
SERVERS_SCRIPT = Path(__file__).resolve().with_name("origin_servers.py")


@dataclass
class Origins:
    process: subprocess.Popen
    ports: dict[str, int]
    workdir: Path
    host: str = ORIGIN_HOST

    def addr(self, name: str = "http") -> tuple[str, int]:
        return (self.host, self.ports[name])

    def authority(self, name: str = "http") -> str:
        return f"{self.host}:{self.ports[name]}"

    def url(self, path: str = "/", name: str = "http") -> str:
        scheme = "https" if name == "tls" else "http"
        return f"{scheme}://{self.authority(name)}{path}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.process, timeout)


def start_origins(workdir: Path, timeout: float = 30.0) -> Origins:
    """Start the origin servers and wait until their ports are known."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports_file = workdir / "origin-ports.json"
    ports_file.unlink(missing_ok=True)  # never read the ports of an earlier run
    log = open(workdir / "origins.log", "wb")
    process = subprocess.Popen(
        [sys.executable, str(SERVERS_SCRIPT), "--ports-file", str(ports_file),
         "--parent-pid", str(os.getpid())],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"origins exited with {process.returncode}: "
                               f"{(workdir / 'origins.log').read_text(errors='replace')[-3000:]}")
        if ports_file.exists():
            ports = json.loads(ports_file.read_text())
            return Origins(process=process, ports=ports, workdir=workdir)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("origins did not report their ports in time")
