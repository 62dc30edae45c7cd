"""The report store interface both backends satisfy, and the store named by `--report-store`.

`sqlite` (the default) is the embedded store in `<state-dir>/reports.sqlite3`;
`postgresql://user@host:port/dbname?sslmode=...` is a PostgreSQL database (libpq conventions).
The password never travels on the command line: it comes from `PGPASSFILE`/`~/.pgpass` (libpq
reads them itself) or from `--report-store-password-file`; a URL that carries one is refused, and
URLs are logged with any password masked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from safesquid_tw.reporting.sqlitestore import IngestResult

SQLITE_FILE = "reports.sqlite3"


class StoreUnavailable(RuntimeError):
    """The report database cannot be reached now; ingest is not acknowledged, pages say so."""


class ReportStoreError(ValueError):
    """A `--report-store` or `--report-read-url` value that cannot be used."""


@runtime_checkable
class ReportStoreBackend(Protocol):
    """What the master's ingest, the retention job and the report pages need of a store.

    Every method blocks (disk or network): call it in a worker thread.
    """

    def ingest(self, node: str, segment: int, first_seq: int, records: list[bytes]) -> IngestResult: ...

    def ingest_many(
        self, batches: Iterable[tuple[str, int, int, list[bytes]]]
    ) -> list[IngestResult | Exception]: ...

    def record_dropped(self, node: str, total_dropped: int) -> None: ...

    def prune(self, older_than: float, batch: int = ...) -> int: ...

    def count(self, **filters: Any) -> int: ...

    def search(self, *, start: float, end: float, **filters: Any) -> list[dict[str, Any]]: ...

    def quarantined(self, *, node: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...

    def dropped_totals(self) -> dict[str, int]: ...

    def reader(self) -> Any:
        """A handle whose `execute(sql, params)` runs a read-only query written with sqlite3
        placeholders (`?`, `?N`) over the roll-up tables, which both backends share."""
        ...

    def close(self) -> None: ...


def is_postgresql(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0] in ("postgresql", "postgres")


def check_url(option: str, url: str) -> None:
    """Refuse what cannot work, naming the option: another scheme, or a password in the URL."""
    if url == "sqlite":
        if option == "report-read-url":
            raise ReportStoreError(f"--{option}: a read replica needs a postgresql:// URL")
        return
    if not is_postgresql(url):
        raise ReportStoreError(f"--{option}: {masked(url)!r} is neither sqlite nor a postgresql:// URL")
    parts = urlsplit(url)
    if parts.password is not None or "password=" in (parts.query or ""):
        raise ReportStoreError(
            f"--{option}: the URL carries a password; put it in PGPASSFILE/~/.pgpass or"
            " --report-store-password-file instead (command lines are visible to every local user)"
        )
    if not parts.hostname and "host=" not in (parts.query or ""):
        raise ReportStoreError(f"--{option}: {masked(url)!r} names no host")


def masked(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def read_password_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        password = f.readline().rstrip("\r\n")
    if not password:
        raise ReportStoreError(f"--report-store-password-file: {path} is empty")
    return password


def open_report_store(
    url: str | None,
    state_dir: Path,
    *,
    read_url: str | None = None,
    password_file: str | None = None,
    **kwargs: Any,
) -> ReportStoreBackend:
    """The store `url` names (None or "sqlite": the embedded SQLite file in `state_dir`)."""
    if not url or url == "sqlite":
        from safesquid_tw.reporting.sqlitestore import ReportStore

        return ReportStore(Path(state_dir) / SQLITE_FILE, **kwargs)
    check_url("report-store", url)
    if read_url:
        check_url("report-read-url", read_url)
    from safesquid_tw.reporting.pgstore import PostgresReportStore

    password = read_password_file(password_file) if password_file else None
    return PostgresReportStore(url, read_url=read_url, password=password, **kwargs)


__all__ = [
    "ReportStoreBackend",
    "ReportStoreError",
    "StoreUnavailable",
    "check_url",
    "is_postgresql",
    "masked",
    "open_report_store",
    "read_password_file",
]
