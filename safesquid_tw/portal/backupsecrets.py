"""What a backup holds beyond the policy history, to rebuild a master: the administrator
accounts with their argon2id hashes, the API tokens (digests only, as stored), the master's
control-plane TLS key and certificate, and, by a switch, the report store.

A backup with these is a secret: whoever holds it can impersonate the master to its slaves.
With the report store it is a `.tar.gz` of `backup.json` and `reports.sqlite3` (a consistent
SQLite snapshot); without, the JSON alone. Restoring a key that differs from this node's is
refused unless the administrator says so (`replace_keys`): slaves pinned to this node's key
would refuse it afterwards, and the new key is used from the next start.

Blocking functions (files, SQLite): call them in a worker thread.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from safesquid_tw.cluster.fingerprints import spki_fingerprint
from safesquid_tw.cluster.tlsconfig import CERT_FILE, KEY_FILE, TLS_DIR
from safesquid_tw.reporting.sqlitestore import FILL_TOP_DAY, FILL_TOP_HOUR
from safesquid_tw.util.atomic import atomic_write

JSON_NAME = "backup.json"
REPORTS_NAME = "reports.sqlite3"
MAX_ARCHIVE_MEMBER = 16 * 1024 * 1024 * 1024
# Tables copied from a backed-up report store into an empty one, in this order.
REPORT_TABLES = ("requests", "quarantine", "rollup_minute", "rollup_hour", "rollup_top", "node_drops")


class SecretsError(ValueError):
    """A part of the backup that cannot be restored; the message says why."""


# -- making ---------------------------------------------------------------------------------------


def control_plane_tls(state_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    tls = Path(state_dir) / TLS_DIR
    try:
        key_pem = (tls / KEY_FILE).read_text("ascii")
        cert_pem = (tls / CERT_FILE).read_text("ascii")
    except FileNotFoundError:
        return None
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    return {"key_pem": key_pem, "cert_pem": cert_pem, "fingerprint": spki_fingerprint(cert)}


def secret_parts(state_dir: str | os.PathLike[str], accounts: Any, tokens: Any) -> dict[str, Any]:
    """The backup's keys beyond the policy history."""
    return {
        "accounts": [{**a.public(), "password_hash": a.password_hash} for a in accounts.accounts()],
        "tokens": [{"id": t.id, "name": t.name, "digest": t.digest, "created_at": t.created_at,
                    "created_by": t.created_by} for t in tokens.tokens()],
        "control_plane_tls": control_plane_tls(state_dir),
    }


def snapshot_reports(store_path: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """A consistent copy of the report store while it is in use (SQLite's online backup)."""
    source = sqlite3.connect(store_path)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


def archive(document: dict[str, Any], store_path: str | os.PathLike[str]) -> bytes:
    """`backup.json` and a snapshot of the report store as one .tar.gz."""
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / REPORTS_NAME
        snapshot_reports(store_path, snapshot)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            data = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
            info = tarfile.TarInfo(JSON_NAME)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
            tar.add(snapshot, arcname=REPORTS_NAME)
        return out.getvalue()


# -- reading --------------------------------------------------------------------------------------


def unpack(data: bytes, workdir: str | os.PathLike[str]) -> tuple[bytes, Path | None]:
    """The backup JSON's bytes and, for an archive, the report store extracted into `workdir`."""
    if not data.startswith(b"\x1f\x8b"):
        return data, None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile() and m.size <= MAX_ARCHIVE_MEMBER}
            if JSON_NAME not in members:
                raise SecretsError(f"the archive holds no {JSON_NAME}")
            document = tar.extractfile(members[JSON_NAME]).read()
            reports = None
            if REPORTS_NAME in members:
                reports = Path(workdir) / REPORTS_NAME
                with tar.extractfile(members[REPORTS_NAME]) as src, open(reports, "wb") as dst:
                    while chunk := src.read(1024 * 1024):
                        dst.write(chunk)
            return document, reports
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SecretsError(f"the archive cannot be read ({e})") from None


def check_tls(part: Any) -> dict[str, str] | None:
    if part is None:
        return None
    if not isinstance(part, dict) or not all(isinstance(part.get(k), str) for k in ("key_pem", "cert_pem")):
        raise SecretsError("'control_plane_tls' must hold 'key_pem' and 'cert_pem'")
    try:
        key = serialization.load_pem_private_key(part["key_pem"].encode("ascii"), password=None)
        cert = x509.load_pem_x509_certificate(part["cert_pem"].encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise SecretsError(f"the control-plane key or certificate cannot be read ({e})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise SecretsError("the control-plane certificate does not belong to its key")
    return {"key_pem": part["key_pem"], "cert_pem": part["cert_pem"], "fingerprint": spki_fingerprint(cert)}


def key_change(state_dir: str | os.PathLike[str], tls: dict[str, str] | None) -> str | None:
    """A warning when restoring `tls` would replace this node's control-plane key, else None."""
    if tls is None:
        return None
    mine = control_plane_tls(state_dir)
    if mine is None or mine["fingerprint"] == tls["fingerprint"]:
        return None
    return (f"the backup's control-plane key ({tls['fingerprint']}) would replace this node's "
            f"({mine['fingerprint']}): slaves that pinned this node's key will refuse it, slaves of the "
            "backed-up master will accept it again. The node uses the restored key from its next start.")


# -- restoring ------------------------------------------------------------------------------------


def write_tls(state_dir: str | os.PathLike[str], tls: dict[str, str]) -> None:
    folder = Path(state_dir) / TLS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(folder / KEY_FILE, tls["key_pem"].encode("ascii"), mode=0o600)
    atomic_write(folder / CERT_FILE, tls["cert_pem"].encode("ascii"), mode=0o644)


def restore_tokens(tokens: Any, entries: Any) -> list[str]:
    """Add the backup's tokens this node lacks (by digest). Returns their ids."""
    if not isinstance(entries, list):
        return []
    from safesquid_tw.portal.tokens import TokenInfo

    added = []
    known = {t.digest for t in tokens.tokens()}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str) or entry["digest"] in known:
            continue
        info = TokenInfo(id=str(entry.get("id") or entry["digest"][:12]), name=str(entry.get("name") or "restored"),
                         digest=entry["digest"], created_at=float(entry.get("created_at") or 0.0),
                         created_by=str(entry.get("created_by") or "restored"))
        tokens.add_restored(info)
        added.append(info.id)
    return added


def import_reports(store: Any, snapshot: Path) -> int:
    """Copy a backed-up report store into this node's, if this one holds no records yet.
    Returns the records copied (0 when this store already had some: nothing is mixed)."""
    conn = store._writer  # the store's own writer connection, under its write lock
    with store._write_lock:
        if conn.execute("SELECT count(*) FROM requests").fetchone()[0]:
            return 0
        conn.execute("ATTACH DATABASE ? AS backup", (str(snapshot),))
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table in REPORT_TABLES:
                mine = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
                theirs = {r[1] for r in conn.execute(f"PRAGMA backup.table_info({table})")}
                columns = ", ".join(c for c in mine if c in theirs)
                if columns:
                    conn.execute(f"INSERT OR IGNORE INTO main.{table} ({columns}) SELECT {columns} FROM backup.{table}")
            # The cluster-wide hourly and the daily top roll-ups are counted again from the
            # per-node hourly one (a backup from an older release has neither).
            conn.execute("DELETE FROM main.rollup_top_hour")
            conn.execute(FILL_TOP_HOUR, (-(2**62), 2**62))
            conn.execute("DELETE FROM main.rollup_top_day")
            conn.execute(FILL_TOP_DAY, (-(2**62), 2**62))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("DETACH DATABASE backup")
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]


__all__ = ["JSON_NAME", "REPORTS_NAME", "SecretsError", "archive", "check_tls", "control_plane_tls",
           "import_reports", "key_change", "restore_tokens", "secret_parts", "unpack", "write_tls"]
