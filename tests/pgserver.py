"""A throw-away PostgreSQL server for tests and benches, from the distribution's binaries.

`initdb` runs as the `postgres` OS user (it refuses root) into a directory under /tmp that every
parent lets that user traverse (pytest's tmp_path is 0700), and the server listens on a free
loopback port with its socket in the same short directory (a socket path is limited to 107
bytes). fsync is off: the tests are about what the master acknowledges, not about disks.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin() -> Path | None:
    for directory in PG_BIN_DIRS:
        if (directory / "initdb").exists():
            return directory
    return None


def why_not_available() -> str | None:
    if pg_bin() is None:
        return "PostgreSQL server binaries are not installed (Debian package postgresql)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no postgres OS user to run initdb as"
    if os.geteuid() != 0:
        return "starting PostgreSQL as the postgres user needs root (runuser)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, *, fsync: bool = False) -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="sstw-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.port = free_port()
        self.fsync = fsync
        self._names = itertools.count(1)
        self._run("initdb", "-A", "trust", "-U", "postgres", "--locale=C", "-E", "UTF8", "-D", str(self.data))

    def _run(self, tool: str, *args: str) -> str:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            check=True, capture_output=True, text=True, cwd=self.dir,
        ).stdout

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync={'on' if self.fsync else 'off'}"
            " -c full_page_writes=off -c max_connections=200 -c shared_buffers=256MB"
        )
        self._run("pg_ctl", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-D", str(self.data), "-m", mode, "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        return self._run("psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-d", database,
                         "-c", statement)

    def new_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole session, removed afterwards."""
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()
