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

import argparse
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ORIGIN_HOST = "127.0.0.1"
SERVER_NAMES = ("http", "http2", "tls", "ws", "silent")
_SMALL_BODY = 64 * 1024  # echoed back verbatim up to this size
_BLOCK = bytes(range(256)) * 1024  # 256 KiB written again and again by /large


# --------------------------------------------------------------------------------------------
# Handle used by the test process
# --------------------------------------------------------------------------------------------


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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_origins(workdir: Path, timeout: float = 30.0) -> Origins:
    """Start the origin servers and wait until their ports are known."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports_file = workdir / "origin-ports.json"
    ports_file.unlink(missing_ok=True)  # never read the ports of an earlier run
    log = open(workdir / "origins.log", "wb")
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--ports-file", str(ports_file),
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


# --------------------------------------------------------------------------------------------
# Servers (run in the subprocess; Twisted and h11 are imported there only)
# --------------------------------------------------------------------------------------------


def _query(target: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(target)
    return parts.path, parse_qs(parts.query, keep_blank_values=True)


def _first(query: dict[str, list[str]], name: str, default: str) -> str:
    return query.get(name, [default])[0]


def _build_servers():  # noqa: C901 - one place for every origin keeps the subprocess simple
    import h11
    from twisted.internet import protocol
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    class Stats:
        def __init__(self) -> None:
            self.connections = 0

    @implementer(IPushProducer)
    class BodyStreamer:
        """Writes `total` generated bytes, pausing whenever the transport's buffer is full."""

        def __init__(self, conn: "HttpOrigin", total: int) -> None:
            self.conn = conn
            self.remaining = total
            self.paused = False
            self.done = False

        def start(self) -> None:
            self.conn.transport.registerProducer(self, True)
            self.resumeProducing()

        def resumeProducing(self) -> None:
            self.paused = False
            send = self.conn.h11.send_with_data_passthrough
            write = self.conn.transport.writeSequence
            while not self.paused and self.remaining > 0 and not self.conn.lost:
                n = min(len(_BLOCK), self.remaining)
                self.remaining -= n
                write(send(h11.Data(data=_BLOCK if n == len(_BLOCK) else _BLOCK[:n])))
            if self.remaining == 0 and not self.done and not self.conn.lost:
                self.done = True
                self.conn.transport.unregisterProducer()
                self.conn.end_response()

        def pauseProducing(self) -> None:
            self.paused = True

        def stopProducing(self) -> None:
            self.paused = True
            self.remaining = 0
            self.done = True

    class HttpOrigin(protocol.Protocol):
        def __init__(self, factory: "HttpOriginFactory") -> None:
            self.factory = factory
            self.lost = False
            self.timers: list = []

        def connectionMade(self) -> None:
            self.factory.stats.connections += 1
            self.conn_id = self.factory.stats.connections
            self.requests_on_conn = 0
            self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
            self.responding = False
            self._reset_request()

        def _reset_request(self) -> None:
            self.request = None
            self.body = bytearray()
            self.body_len = 0
            self.body_hash = hashlib.sha256()
            self.sent_100 = False
            self.body_before_100 = False

        def connectionLost(self, reason=None) -> None:
            self.lost = True
            for timer in self.timers:
                if timer.active():
                    timer.cancel()

        def dataReceived(self, data: bytes) -> None:
            self.h11.receive_data(data)
            self._pump()

        def _pump(self) -> None:
            while not self.responding and not self.lost:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as e:
                    msg = f"origin refused the request: {e}".encode()
                    self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                                         b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg))
                    self.transport.loseConnection()
                    return
                if event is h11.NEED_DATA:
                    if self.request is not None and self.h11.they_are_waiting_for_100_continue \
                            and not self.sent_100:
                        self.transport.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
                        self.sent_100 = True
                    return
                if event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self.requests_on_conn += 1
                    self.request = event
                elif isinstance(event, h11.Data):
                    if self._expects_100() and not self.sent_100:
                        self.body_before_100 = True
                    self.body_len += len(event.data)
                    self.body_hash.update(event.data)
                    if len(self.body) <= _SMALL_BODY:
                        self.body += event.data[: _SMALL_BODY + 1 - len(self.body)]
                elif isinstance(event, h11.EndOfMessage):
                    self.responding = True
                    self._dispatch()
                elif isinstance(event, h11.ConnectionClosed):
                    self.transport.loseConnection()
                    return

        def _expects_100(self) -> bool:
            return any(n.lower() == b"expect" and v.lower() == b"100-continue"
                       for n, v in self.request.headers.raw_items())

        # -- responses -------------------------------------------------------------------

        def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
            self.transport.write(self.h11.send(h11.Response(status_code=status, headers=headers)))

        def send_data(self, data: bytes) -> None:
            if data:
                self.transport.writeSequence(self.h11.send_with_data_passthrough(h11.Data(data=data)))

        def end_response(self) -> None:
            if self.lost:
                return
            self.transport.write(self.h11.send(h11.EndOfMessage()))
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
                self._reset_request()
                self.responding = False
                self._pump()
            else:
                self.transport.loseConnection()

        def later(self, delay: float, fn, *args) -> None:
            from twisted.internet import reactor

            self.timers.append(reactor.callLater(delay, fn, *args))

        def _dispatch(self) -> None:
            target = self.request.target.decode("latin-1")
            path, query = _query(target)
            handler = {
                "/large": self._large,
                "/chunked": self._chunked,
                "/trickle": self._trickle,
                "/slow": self._slow,
                "/respond": self._respond,
            }.get(path, self._echo)
            try:
                handler(query)
            except (ValueError, KeyError) as e:
                body = f"bad test origin query: {e}".encode()
                self.send_head(400, [("Content-Length", str(len(body)))])
                self.send_data(body)
                self.end_response()

        def echo_document(self) -> dict:
            req = self.request
            small = self.body_len <= _SMALL_BODY
            return {
                "method": req.method.decode("latin-1"),
                "target": req.target.decode("latin-1"),
                "version": req.http_version.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers.raw_items()],
                "body_len": self.body_len,
                "body_sha256": self.body_hash.hexdigest(),
                "body_b64": base64.b64encode(bytes(self.body)).decode() if small else None,
                "conn": self.conn_id,
                "req_on_conn": self.requests_on_conn,
                "connections": self.factory.stats.connections,
                "origin": self.factory.name,
                "expect_100": self._expects_100(),
                "sent_100": self.sent_100,
                "body_before_100": self.body_before_100,
            }

        def _echo(self, query: dict, extra_headers: list[tuple[str, str]] = ()) -> None:
            body = json.dumps(self.echo_document()).encode()
            self.send_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                 *extra_headers])
            self.send_data(body)
            self.end_response()

        def _slow(self, query: dict) -> None:
            self.later(float(_first(query, "delay", "1")), self._echo, query)

        def _large(self, query: dict) -> None:
            total = int(_first(query, "bytes", "0"))
            headers = [("Content-Type", _first(query, "ctype", "application/octet-stream"))]
            if _first(query, "chunked", "0") != "1":
                headers.append(("Content-Length", str(total)))
            self.send_head(200, headers)
            BodyStreamer(self, total).start()

        def _chunked(self, query: dict) -> None:
            chunks = int(_first(query, "chunks", "3"))
            size = int(_first(query, "size", "10"))
            interval = float(_first(query, "interval", "0"))
            self.send_head(200, [("Content-Type", _first(query, "ctype", "text/plain"))])
            self._write_pieces(chunks, size, interval)

        def _trickle(self, query: dict) -> None:
            chunks = int(_first(query, "chunks", "10"))
            size = int(_first(query, "size", "100"))
            interval = float(_first(query, "interval", "0.1"))
            self.send_head(200, [("Content-Type", "application/octet-stream"),
                                 ("Content-Length", str(chunks * size))])
            self._write_pieces(chunks, size, interval)

        def _write_pieces(self, chunks: int, size: int, interval: float, index: int = 0) -> None:
            if self.lost:
                return
            if index == chunks:
                self.end_response()
                return
            self.send_data(bytes([97 + index % 26]) * size)
            if interval > 0:
                self.later(interval, self._write_pieces, chunks, size, interval, index + 1)
            else:
                self._write_pieces(chunks, size, interval, index + 1)

        def _respond(self, query: dict) -> None:
            status = int(_first(query, "status", "200"))
            headers = [("Content-Type", _first(query, "ctype", "text/plain"))]
            for item in query.get("h", []):
                name, _, value = item.partition(":")
                headers.append((name.strip(), value.strip()))
            if "size" in query:
                body = b"z" * int(_first(query, "size", "0"))
            else:
                body = _first(query, "body", "ok").encode()
            if _first(query, "cl", "1") != "0":
                headers.append(("Content-Length", str(len(body))))
            self.send_head(status, headers)
            self.send_data(body)
            self.end_response()

    class HttpOriginFactory(protocol.Factory):
        def __init__(self, name: str) -> None:
            self.name = name
            self.stats = Stats()

        def buildProtocol(self, addr):
            return HttpOrigin(self)

    class WebSocketEcho(protocol.Protocol):
        """Minimal Upgrade origin: 101 to `Upgrade: websocket`, then every byte echoed."""

        def connectionMade(self) -> None:
            self.buffer = b""
            self.upgraded = False

        def dataReceived(self, data: bytes) -> None:
            if self.upgraded:
                self.transport.write(data)
                return
            self.buffer += data
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                if len(self.buffer) > 65536:
                    self.transport.loseConnection()
                return
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
            if b"websocket" not in fields.get(b"upgrade", b"").lower():
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.loseConnection()
                return
            key = fields.get(b"sec-websocket-key", b"")
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.upgraded = True
            if rest:
                self.transport.write(rest)

    class Silent(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            pass

    return {
        "http": HttpOriginFactory("http"),
        "http2": HttpOriginFactory("http2"),
        "tls": HttpOriginFactory("tls"),
        "ws": protocol.Factory.forProtocol(WebSocketEcho),
        "silent": protocol.Factory.forProtocol(Silent),
    }


def _self_signed_pem() -> bytes:
    """A fresh key and self-signed certificate for 127.0.0.1 and localhost, as PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "safesquid-test-origin")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(ORIGIN_HOST))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports-file", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)

    from twisted.internet import reactor, ssl, task

    factories = _build_servers()
    certificate = ssl.PrivateCertificate.loadPEM(_self_signed_pem())
    # Naming the protocol matters: clients such as curl offer ALPN (h2, http/1.1), and a server
    # context without an ALPN choice answers them with an "internal error" alert.
    tls_options = ssl.CertificateOptions(privateKey=certificate.privateKey.original,
                                         certificate=certificate.original, acceptableProtocols=[b"http/1.1"])
    ports = {}
    for name, factory in factories.items():
        if name == "tls":
            port = reactor.listenSSL(0, factory, tls_options, interface=ORIGIN_HOST)
        else:
            port = reactor.listenTCP(0, factory, interface=ORIGIN_HOST, backlog=256)
        ports[name] = port.getHost().port

    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, args.ports_file)

    def stop_when_orphaned() -> None:
        # The test run died without stopping us: do not outlive it.
        if args.parent_pid and os.getppid() != args.parent_pid:
            reactor.stop()

    task.LoopingCall(stop_when_orphaned).start(1.0)
    reactor.run()


if __name__ == "__main__":
    main()
