"""HTTPS origin servers for the TLS inspection tests, in threads of the test process.

Each serves one certificate: from a test CA (given to the node with --upstream-ca-file), or
deliberately wrong (self-signed, expired, for another name, from an unknown CA). Every answer
echoes what the origin received as JSON, so a test sees the request the proxy forwarded.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/eicar"):
            # The anti-virus test file, for scanning inside inspected tunnels.
            data = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.path.startswith("/download/"):
            data = b"MZ" + b"\0" * 100
            self.send_response(200)
            self.send_header("Content-Type", "application/x-msdownload")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            # An echo of whatever comes next, until the peer closes.
            while True:
                chunk = self.connection.recv(4096)
                if not chunk:
                    break
                self.connection.sendall(chunk)
            self.close_connection = True
            return
        echo = json.dumps({
            "method": self.command, "path": self.path, "headers": dict(self.headers.items()),
            "body_length": len(body), "server": self.server.label,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(echo)))
        self.end_headers()
        self.wfile.write(echo)

    do_GET = do_POST = do_PUT = do_HEAD = _answer


class TlsOrigin:
    def __init__(self, cert_pem: bytes, key_pem: bytes, label: str, host: str = "127.0.0.1") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tls-origin-"))
        (self.dir / "cert.pem").write_bytes(cert_pem)
        (self.dir / "key.pem").write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.dir / "cert.pem", self.dir / "key.pem")
        server = ThreadingHTTPServer((host, 0), _Echo)
        server.label = label
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.server = server
        self.port = server.server_address[1]
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


class OriginSet:
    """The good origin and one per kind of certificate error, all named `localhost`."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.dir = Path(tempfile.mkdtemp(prefix="tls-origins-"))
        self.ca_file = self.dir / "upstream-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        now = datetime.datetime.now(datetime.timezone.utc)

        def leaf(ca, *names, **kw):
            cert = ca.issue_cert(*names, **kw)
            return cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes()

        self.good = TlsOrigin(*leaf(self.ca, "localhost", "127.0.0.1"), "good")
        self.self_signed = TlsOrigin(*self_signed("localhost"), "self-signed")
        self.expired = TlsOrigin(*leaf(self.ca, "localhost", not_before=now - datetime.timedelta(days=30),
                                       not_after=now - datetime.timedelta(days=1)), "expired")
        self.wrong_name = TlsOrigin(*leaf(self.ca, "wrong.example"), "wrong-name")
        self.unknown_ca = TlsOrigin(*leaf(trustme.CA(), "localhost"), "unknown-ca")

    def all(self) -> list[TlsOrigin]:
        return [self.good, self.self_signed, self.expired, self.wrong_name, self.unknown_ca]

    def stop(self) -> None:
        for origin in self.all():
            origin.stop()


def https_via_proxy(proxy: tuple[str, int], host: str, port: int, path: str, *, cafile: str,
                    method: str = "GET", body: bytes | None = None, headers: dict | None = None,
                    timeout: float = 10.0):
    """One HTTPS request through the proxy (CONNECT), the client verifying the server's certificate
    against `cafile`. Returns (status, headers, body, peer certificate as DER)."""
    import http.client

    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection(proxy[0], proxy[1], context=ctx, timeout=timeout)
    conn.set_tunnel(host, port)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data, der
    finally:
        conn.close()


def connect_tunnel(proxy: tuple[str, int], authority: str, timeout: float = 10.0) -> socket.socket:
    """A raw CONNECT; returns the socket after the proxy's 200."""
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"proxy closed during CONNECT: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"CONNECT refused: {head!r}")
    return sock
