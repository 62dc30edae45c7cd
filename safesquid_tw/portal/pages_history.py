"""Policy history (who, when, why, which nodes run it), readable diffs, rollback, backup, restore."""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from typing import Any

from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.portal import backup as B
from safesquid_tw.portal import backupsecrets as S
from safesquid_tw.portal.diffview import classify, counts, pretty
from safesquid_tw.portal.web import Body, Call, Error, Page, Redirect, Reply, Route, route

READ_ONLY = Error(409, "Read-only", "This node's policy is managed by its master; its history is kept there.")


def nodes_by_version(ctx: Any) -> dict[int | None, list[str]]:
    """Which nodes run which policy version: the slaves (on a master), else this node."""
    current = ctx.store.current
    grouped: dict[int | None, list[str]] = defaultdict(list)
    if ctx.registry is not None:
        for node in ctx.registry.snapshot(current.version if current else None):
            if node.get("connected"):
                grouped[node.get("policy_version")].append(node["name"])
    elif current is not None:
        grouped[current.version].append(ctx.state.node)
    return grouped


async def history_page(call: Call) -> Reply:
    ctx = call.services.ctx
    if ctx.history is None:
        return READ_ONLY
    versions = ctx.history.versions()
    current = ctx.store.current
    return Page("portal/history.html", {
        "versions": versions, "current": current, "nodes": nodes_by_version(ctx),
        "newest": versions[0].version if versions else None,
        "oldest": versions[-1].version if versions else None,
    })


def _version(value: str) -> int | None:
    return int(value) if value.isdigit() else None


async def version_page(call: Call) -> Reply:
    history = call.services.ctx.history
    if history is None:
        return READ_ONLY
    number = _version(call.params["version"])
    try:
        info = history.info(number) if number is not None else None
        document = await call.services.in_thread(history.document, number) if info else None
    except (KeyError, OSError):
        info = None
    if info is None or document is None:
        return Error(404, "Not found", "There is no such policy version.")
    return Page("portal/version.html", {"info": info, "text": "\n".join(pretty(document))})


async def diff_page(call: Call) -> Reply:
    history = call.services.ctx.history
    if history is None:
        return READ_ONLY
    old, new = _version(call.form.get("from")), _version(call.form.get("to"))
    if old is None or new is None:
        return Error(400, "Bad request", "Name two versions to compare: ?from=N&to=M.")
    try:
        text = await call.services.in_thread(history.diff, old, new)
    except KeyError as e:
        return Error(404, "Not found", str(e.args[0]) if e.args else "There is no such version.")
    lines = classify(text)
    added, removed = counts(lines)
    return Page("portal/diff.html", {"old": old, "new": new, "lines": lines, "added": added, "removed": removed,
                                     "versions": [v.version for v in history.versions()]})


async def rollback(call: Call) -> Reply:
    services = call.services
    history = services.ctx.history
    if history is None:
        return READ_ONLY
    number = _version(call.form.get("version"))
    comment = call.form.get("comment").strip()
    before = services.ctx.store.current
    try:
        if number is None:
            raise KeyError("name the version to roll back to")
        policy = await history.rollback_async(number, by=call.account, comment=comment)
    except PolicySuperseded as e:
        call.session.flash("error", f"Not rolled back: {e}")
        return Redirect("/policy/history")
    except KeyError as e:
        call.session.flash("error", str(e.args[0]) if e.args else "There is no such version.")
        return Redirect("/policy/history")
    except PolicyError as e:
        call.session.flash("error", f"Version {number} no longer validates: {e}")
        return Redirect("/policy/history")
    if before is not None and policy.version == before.version:
        call.session.flash("info", f"Version {number} has the same content as the running version {policy.version}.")
        return Redirect("/policy/history")
    services.audit.record("rollback", actor=call.account, address=call.address, to_version=number,
                          version=policy.version, digest=policy.digest, comment=comment)
    call.session.flash("ok", f"Rolled back to version {number}: it runs as version {policy.version}.")
    return Redirect("/policy/history")


# -- backup and restore --------------------------------------------------------------------------


async def make_backup(services: Any) -> dict[str, Any]:
    ctx = services.ctx
    current = ctx.store.current

    def build() -> dict[str, Any]:
        parts = S.secret_parts(ctx.state_dir, services.accounts, services.tokens)
        document = B.build_backup(ctx.history, parts.pop("accounts"), node=ctx.state.node, role=ctx.role,
                                  now=services.now(), current_version=current.version if current else None)
        document.update(parts)
        return document

    return await services.in_thread(build)


class KeysWouldChange(B.BackupError):
    """The backup's control-plane key differs from this node's and replacing it was not confirmed."""


async def restore(services: Any, data: bytes, *, by: str, address: str | None,
                  replace_keys: bool = False) -> dict[str, Any]:
    """Check a backup and restore it; BackupError says why not (nothing changed then)."""
    ctx = services.ctx
    history = ctx.history
    if not B.is_fresh(history):
        raise B.BackupError("this node's policy was already changed by an administrator: restore only onto a "
                            "fresh node, whose policy so far comes from files only")
    with tempfile.TemporaryDirectory(dir=ctx.state_dir) as workdir:
        try:
            raw, reports_file = await services.in_thread(S.unpack, data, workdir)
            parsed = await services.in_thread(B.parse_backup, raw)
            versions, accounts = await services.in_thread(B.check_backup, parsed)
            tls = S.check_tls(parsed.get("control_plane_tls"))
        except S.SecretsError as e:
            raise B.BackupError(str(e)) from None
        warning = await services.in_thread(S.key_change, ctx.state_dir, tls)
        if warning and not replace_keys:
            raise KeysWouldChange(f"Nothing was restored: {warning} Confirm replacing the key to restore.")
        made = await B.replay_async(history, versions, by=by)
        created, replaced = await services.in_thread(services.accounts.restore_hashes, accounts, by=by)
        without_hash = [a for a in accounts if not a.get("password_hash")]
        created += await services.in_thread(services.accounts.restore_public, without_hash, by=by)
        tokens_added = await services.in_thread(S.restore_tokens, services.tokens, parsed.get("tokens"))
        key_replaced = False
        if tls is not None and (warning or S.control_plane_tls(ctx.state_dir) is None):
            await services.in_thread(S.write_tls, ctx.state_dir, tls)
            key_replaced = bool(warning)
        records = 0
        if reports_file is not None and ctx.reports is not None:
            records = await services.in_thread(S.import_reports, ctx.reports, reports_file)
    for name in replaced:
        services.sessions.end_account(name)
    services.audit.record("restore", actor=by, address=address, versions=len(versions), new_versions=made,
                          accounts_created=created, passwords_restored=replaced, tokens_restored=tokens_added,
                          key_replaced=key_replaced, report_records=records)
    return {"versions_restored": len(versions), "new_versions": made, "accounts_created": created,
            "passwords_restored": replaced, "tokens_restored": tokens_added, "key_replaced": key_replaced,
            "report_records_restored": records}


async def backup_page(call: Call) -> Reply:
    if call.services.ctx.history is None:
        return READ_ONLY
    return Page("portal/backup.html", {"fresh": B.is_fresh(call.services.ctx.history), "error": None,
                                       "has_reports": call.services.ctx.reports is not None})


async def download_backup(call: Call) -> Reply:
    if call.services.ctx.history is None:
        return READ_ONLY
    services = call.services
    document = await make_backup(services)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(services.now()))
    with_reports = call.form.checked("reports") and services.ctx.reports is not None
    if with_reports:
        data = await services.heavy.run(S.archive, document, services.ctx.reports.path)
        name, content_type = f"safesquid-backup-{stamp}.tar.gz".encode(), b"application/gzip"
    else:
        data = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        name, content_type = f"safesquid-backup-{stamp}.json".encode(), b"application/json"
    services.audit.record("backup", actor=call.account, address=call.address, versions=len(document["versions"]),
                          reports=with_reports)
    return Body(data, content_type, headers=((b"Content-Disposition", b'attachment; filename="' + name + b'"'),))


async def restore_upload(call: Call) -> Reply:
    services = call.services
    if services.ctx.history is None:
        return READ_ONLY
    raw = call.request.args.get(b"backup", [b""])[-1]
    if not raw.strip():
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history),
                                           "has_reports": services.ctx.reports is not None,
                                           "error": "Choose a backup file first."}, code=422)
    try:
        result = await restore(services, raw, by=call.account, address=call.address,
                               replace_keys=call.form.checked("replace_keys"))
    except KeysWouldChange as e:
        return Page("portal/backup.html", {"fresh": True, "error": None, "key_warning": str(e),
                                           "has_reports": services.ctx.reports is not None}, code=409)
    except B.BackupError as e:
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history),
                                           "has_reports": services.ctx.reports is not None, "error": str(e)}, code=422)
    except PolicyError as e:
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history),
                                           "has_reports": services.ctx.reports is not None,
                                           "error": f"not restored: {e}"}, code=422)
    note = f"Restored {result['versions_restored']} versions"
    if result["passwords_restored"]:
        note += f"; passwords from the backup for {', '.join(result['passwords_restored'])}"
    if result["tokens_restored"]:
        note += f"; {len(result['tokens_restored'])} API token(s)"
    if result["key_replaced"]:
        note += "; the control-plane key and certificate (used from the next restart)"
    if result["report_records_restored"]:
        note += f"; {result['report_records_restored']} report records"
    if result["accounts_created"]:
        note += f"; accounts without a password yet: {', '.join(result['accounts_created'])} (set them on Accounts)"
    call.session.flash("ok", note + ".")
    return Redirect("/policy/history")


ROUTES: list[Route] = [
    route("GET", "/policy/history", history_page),
    route("GET", "/policy/diff", diff_page),
    route("POST", "/policy/rollback", rollback),
    route("GET", "/policy/versions/{version}", version_page),
    route("GET", "/backup", backup_page),
    route("GET", "/backup/download", download_backup),
    route("POST", "/backup/restore", restore_upload),
]

__all__ = ["ROUTES", "make_backup", "nodes_by_version", "restore"]
