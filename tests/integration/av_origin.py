"""An origin for the anti-virus tests: serves EICAR and clean bodies in every framing, and
remembers every request it received (so a test can prove an upload never reached it)."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from icap_servers import EICAR


def clean_bytes(size: int, seed: str = "clean") -> bytes:
    """Deterministic bytes that no signature matches."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "AvOrigin"

    def log_message(self, *args) -> None:
        pass

    def _body_for(self, query: dict) -> bytes:
        kind = query.get("kind", ["clean"])[0]
        size = int(query.get("size", ["1000"])[0])
        if kind == "eicar":
            return EICAR
        if kind == "eicar-padded":  # EICAR followed by clean bytes up to `size`
            return EICAR + clean_bytes(max(0, size - len(EICAR)))
        if kind == "modify":
            return b"please modify-me"
        if kind == "eicar-late":  # clean bytes, then EICAR at the end (past any preview)
            return clean_bytes(max(0, size - len(EICAR))) + EICAR
        return clean_bytes(size, query.get("seed", ["clean"])[0])

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        self.server.seen.append(("GET", parts.path, None))
        body = self._body_for(query)
        mode = query.get("framing", ["length"])[0]
        self.send_response(200)
        self.send_header("Content-Type", query.get("ctype", ["application/octet-stream"])[0])
        if mode == "chunked":
            split = int(query.get("split", ["0"])[0]) or max(1, len(body) // 3)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for at in range(0, len(body), split):
                piece = body[at : at + split]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif mode == "close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            body = bytes(body)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append(("POST", parts.path, body))
        answer = b"stored %d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class AvOrigin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.seen: list[tuple[str, str, bytes | None]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
