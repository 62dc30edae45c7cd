"""Policy history (who, when, why, which nodes run it), readable diffs, rollback, backup, restore."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.portal import backup as B
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
    accounts = [a.public() for a in services.accounts.accounts()]
    return await services.in_thread(B.build_backup, ctx.history, accounts, node=ctx.state.node, role=ctx.role,
                                    now=services.now(), current_version=current.version if current else None)


async def restore(services: Any, data: bytes, *, by: str, address: str | None) -> dict[str, Any]:
    """Check a backup and restore it; BackupError says why not (nothing changed then)."""
    history = services.ctx.history
    if not B.is_fresh(history):
        raise B.BackupError("this node's policy was already changed by an administrator: restore only onto a "
                            "fresh node, whose policy so far comes from files only")
    parsed = await services.in_thread(B.parse_backup, data)
    versions, accounts = await services.in_thread(B.check_backup, parsed)
    made = await B.replay_async(history, versions, by=by)
    created = await services.in_thread(services.accounts.restore_public, accounts, by=by)
    services.audit.record("restore", actor=by, address=address, versions=len(versions), new_versions=made,
                          accounts_created=created)
    return {"versions_restored": len(versions), "new_versions": made, "accounts_created": created}


async def backup_page(call: Call) -> Reply:
    if call.services.ctx.history is None:
        return READ_ONLY
    return Page("portal/backup.html", {"fresh": B.is_fresh(call.services.ctx.history), "error": None})


async def download_backup(call: Call) -> Reply:
    if call.services.ctx.history is None:
        return READ_ONLY
    document = await make_backup(call.services)
    data = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(call.services.now()))
    name = f"safesquid-backup-{stamp}.json".encode()
    call.services.audit.record("backup", actor=call.account, address=call.address, versions=len(document["versions"]))
    return Body(data, b"application/json", headers=((b"Content-Disposition", b'attachment; filename="' + name + b'"'),))


async def restore_upload(call: Call) -> Reply:
    services = call.services
    if services.ctx.history is None:
        return READ_ONLY
    raw = call.request.args.get(b"backup", [b""])[-1]
    if not raw.strip():
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history),
                                           "error": "Choose a backup file first."}, code=422)
    try:
        result = await restore(services, raw, by=call.account, address=call.address)
    except B.BackupError as e:
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history), "error": str(e)}, code=422)
    except PolicyError as e:
        return Page("portal/backup.html", {"fresh": B.is_fresh(services.ctx.history),
                                           "error": f"not restored: {e}"}, code=422)
    note = f"Restored {result['versions_restored']} versions"
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
