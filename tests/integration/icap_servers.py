"""A real ClamAV `clamd` and `c-icap` with its virus_scan service, run from a temporary directory.

No signature download is possible here, so the database is one `.ndb` body signature of the
EICAR test string, written offline; clamd reports it with a `.UNOFFICIAL` suffix. clamd must
answer `PING` before c-icap starts: a c-icap that started first answers 204 to everything.
Both run in their own process groups (c-icap's children keep the port otherwise).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from processes import free_port, stop_process

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE_NAME = "Eicar-Test-Signature"
THREAT_NAME = SIGNATURE_NAME + ".UNOFFICIAL"


def _c_icap_modules() -> Path:
    """Where Debian's c-icap keeps its modules: /usr/lib/<multiarch triplet>/c_icap."""
    found = sorted(Path("/usr/lib").glob("*/c_icap/virus_scan.so"))
    return found[0].parent if found else Path("/usr/lib/c_icap")


C_ICAP_MODULES = _c_icap_modules()


def missing_tools() -> str | None:
    """Why the real scanners cannot run here, or None."""
    for tool in ("clamd", "c-icap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages clamav-daemon, c-icap)"
    if not (C_ICAP_MODULES / "virus_scan.so").exists():
        return "c-icap's virus_scan module is missing (Debian package libc-icap-mod-virus-scan)"
    return None


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)




class Clamd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.socket = workdir / "clamd.sock"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "Clamd":
        db = self.dir / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "eicar.ndb").write_text(f"{SIGNATURE_NAME}:0:*:{EICAR.hex()}\n")
        conf = self.dir / "clamd.conf"
        lines = [
            "Foreground yes",
            f"LocalSocket {self.socket}",
            f"DatabaseDirectory {db}",
            f"LogFile {self.dir / 'clamd.log'}",
            f"TemporaryDirectory {self.dir}",
            f"PidFile {self.dir / 'clamd.pid'}",
            "StreamMaxLength 200M",
            "MaxScanSize 400M",
            "MaxFileSize 200M",
        ]
        if os.geteuid() != 0:
            lines.append(f"User {os.environ.get('USER', 'nobody')}")
        conf.write_text("\n".join(lines) + "\n")
        out = open(self.dir / "clamd.out", "ab")
        self.process = subprocess.Popen(["clamd", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        _wait(self.ping, timeout, "clamd to answer PING")
        return self

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"clamd exited: {(self.dir / 'clamd.out').read_text()[-2000:]}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, group=True)


class CIcap:
    def __init__(self, workdir: Path, clamd_socket: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.dir = workdir
        self.clamd_socket = clamd_socket
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"icap://{self.host}:{self.port}/avscan"

    def start(self, timeout: float = 30.0) -> "CIcap":
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "c-icap.conf"
        conf.write_text("\n".join([
            f"PidFile {self.dir / 'c-icap.pid'}",
            f"CommandsSocket {self.dir / 'c-icap.ctl'}",
            "Timeout 300",
            "MaxKeepAliveRequests 1000",
            "KeepAliveTimeout 600",
            "StartServers 1",
            "MaxServers 2",
            "MinSpareThreads 10",
            "MaxSpareThreads 20",
            "ThreadsPerChild 30",
            "MaxRequestsPerChild 0",
            f"Port {self.host}:{self.port}",
            f"TmpDir {self.dir}",
            "MaxMemObject 131072",
            "DebugLevel 1",
            "Pipelining on",
            f"ModulesDir {C_ICAP_MODULES}",
            f"ServicesDir {C_ICAP_MODULES}",
            "TemplateDir /usr/share/c_icap/templates/",
            "TemplateDefaultLanguage en",
            "LoadMagicFile /etc/c-icap/c-icap.magic",
            f"ServerLog {self.dir / 'server.log'}",
            f"AccessLog {self.dir / 'access.log'}",
            "Module common clamd_mod.so",
            f"clamd_mod.ClamdSocket {self.clamd_socket}",
            "Service antivirus_module virus_scan.so",
            "ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple",
            "virus_scan.DefaultEngine clamd",
            "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE",
            "virus_scan.SendPercentData 0",
            "virus_scan.MaxObjectSize 200M",
        ]) + "\n")
        out = open(self.dir / "c-icap.out", "ab")
        self.process = subprocess.Popen(["c-icap", "-N", "-D", "-f", str(conf)], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self.answers_options, timeout, f"c-icap on port {self.port}")
        return self

    def answers_options(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"c-icap exited: {(self.dir / 'c-icap.out').read_text()[-2000:]}")
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.sendall(f"OPTIONS {self.url} ICAP/1.0\r\nHost: {self.host}\r\nEncapsulated: null-body=0\r\n\r\n"
                          .encode())
                return s.recv(4096).startswith(b"ICAP/1.0 200")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, group=True)


class Scanners:
    """clamd and one c-icap; `stop_icap`/`start_icap` take the ICAP side down and up again."""

    def __init__(self, workdir: Path) -> None:
        self.clamd = Clamd(workdir / "clamd")
        self.clamd.dir.mkdir(parents=True, exist_ok=True)
        self.icap = CIcap(workdir / "c-icap", self.clamd.socket)

    @property
    def url(self) -> str:
        return self.icap.url

    def start(self) -> "Scanners":
        self.clamd.start()
        self.icap.start()
        return self

    def stop(self) -> None:
        self.icap.stop()
        self.clamd.stop()


class SilentServer:
    """A TCP port that accepts ICAP connections and never answers (a hung scanner)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host = host
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"icap://{self.host}:{self.port}/avscan"

    def close(self) -> None:
        self.sock.close()


class ModifyingServer:
    """A small RFC 3507 service for what c-icap's virus_scan never does: it finds EICAR (so the
    node's self-test passes), answers 204 for ordinary bodies, and for a body containing
    `modify-me` answers 200 with a modified message (new head field, body in upper case)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import socketserver
        import threading

        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    while outer._one(self.rfile, self.wfile):
                        pass
                except (OSError, ValueError):
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, 0), Handler)
        self.host = host
        self.port = self.server.server_address[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"icap://{self.host}:{self.port}/modify"

    @staticmethod
    def _head(rfile) -> bytes:
        lines = []
        while True:
            line = rfile.readline(65536)
            if not line:
                raise ValueError("closed")
            lines.append(line)
            if line in (b"\r\n", b"\n"):
                return b"".join(lines)

    @staticmethod
    def _chunks(rfile) -> tuple[bytes, bool]:
        body = bytearray()
        while True:
            line = rfile.readline(4096)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                rfile.readline()
                return bytes(body), b"ieof" in line
            body += rfile.read(size)
            rfile.readline()

    def _one(self, rfile, wfile) -> bool:
        head = self._head(rfile)
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if head.startswith(b"OPTIONS"):
            wfile.write(b'ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: "MOD-1"\r\nPreview: 16\r\n'
                        b"Allow: 204\r\nOptions-TTL: 3600\r\nEncapsulated: null-body=0\r\n\r\n")
            return True
        sections = [(p.split(b"=")[0].strip(), int(p.split(b"=")[1])) for p in fields[b"encapsulated"].split(b",")]
        heads = rfile.read(sections[-1][1])
        body = b""
        if sections[-1][0] != b"null-body":
            body, ieof = self._chunks(rfile)
            if b"preview" in fields and not ieof:
                wfile.write(b"ICAP/1.0 100 Continue\r\n\r\n")
                wfile.flush()
                rest, _ = self._chunks(rfile)
                body += rest
        self.seen.append(body)
        if EICAR in body:
            res = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\r\n"
            wfile.write(b'ICAP/1.0 200 OK\r\nISTag: "MOD-1"\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Mod.Test;\r\n'
                        b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(res) + res + b"5\r\nvirus\r\n0\r\n\r\n")
        elif b"modify-me" in body:
            is_response = b"res-hdr" in fields[b"encapsulated"]
            http_heads = heads.split(b"\r\n\r\n")
            original = http_heads[1 if is_response else 0]
            new_head = original + b"\r\nX-Modified-By: modify-service\r\n\r\n"
            new_body = body.upper()
            name = b"res" if is_response else b"req"
            wfile.write(b'ICAP/1.0 200 OK\r\nISTag: "MOD-1"\r\nEncapsulated: %s-hdr=0, %s-body=%d\r\n\r\n'
                        % (name, name, len(new_head)) + new_head
                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(new_body), new_body))
        else:
            wfile.write(b'ICAP/1.0 204 No Content\r\nISTag: "MOD-1"\r\n\r\n')
        wfile.flush()
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
