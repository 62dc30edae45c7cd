"""The cluster page (every node's state, refreshed by the browser, task buttons) and, on a slave,
the node's own startup parameters with a restart button."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from safesquid_tw.master.registry import TASKS
from safesquid_tw.portal.startup import FIELDS, StartupParamError
from safesquid_tw.portal.web import Call, Error, Json, Page, Redirect, Reply, Route, route

TASK_TIMEOUT = 15.0


def cluster_view(ctx: Any) -> dict[str, Any]:
    """The cluster view as JSON (the same shape as `GET /api/v1/cluster`)."""
    current = ctx.store.current
    version = current.version if current else None
    nodes = ctx.registry.snapshot(version) if ctx.registry is not None else []
    return {
        "role": ctx.role,
        "node": ctx.state.node,
        "policy_version": version,
        "policy_digest": current.digest if current else None,
        "nodes": nodes,
    }


async def cluster_page(call: Call) -> Reply:
    ctx = call.services.ctx
    view = cluster_view(ctx)
    return Page("portal/cluster.html", {"view": view, "tasks": TASKS, "state": ctx.state,
                                        "has_startup": ctx.startup_params is not None})


async def cluster_json(call: Call) -> Reply:
    return Json(cluster_view(call.services.ctx))


async def send_task(call: Call) -> Reply:
    ctx = call.services.ctx
    if ctx.registry is None:
        return Error(409, "No cluster", "Only a master sends tasks to nodes.")
    node, task = call.form.get("node"), call.form.get("task")
    if task == "remove":
        outcome, ok = remove_node(call.services, node, actor=call.account, address=call.address)
        call.session.flash("ok" if ok else "error", f"remove {node}: {outcome}")
        return Redirect("/cluster")
    outcome, ok = await run_task(call.services, node, task, actor=call.account, address=call.address)
    call.session.flash("ok" if ok else "error", f"{task} on {node}: {outcome}")
    return Redirect("/cluster")


async def run_task(services: Any, node: str, task: str, *, actor: str, address: str | None) -> tuple[str, bool]:
    """Send a task and wait (bounded) for the node's answer: (what happened, whether it worked)."""
    ctx = services.ctx
    d = ctx.registry.send_task(node, task)
    d.addTimeout(TASK_TIMEOUT, ctx.reactor)
    try:
        result = await d
        outcome, ok = str(result) if result is not None else "done", True
    except defer.TimeoutError:
        outcome, ok = f"no answer within {TASK_TIMEOUT:g} s", False
    except (KeyError, ValueError) as e:
        outcome, ok = str(e.args[0]) if e.args else str(e), False
    except Exception as e:  # the node refused or the connection dropped
        outcome, ok = f"failed: {e}", False
    services.audit.record("task", actor=actor, address=address, node=node, task=task, ok=ok, outcome=outcome)
    return outcome, ok


def remove_node(services: Any, node: str, *, actor: str, address: str | None) -> tuple[str, bool]:
    """Forget a departed or renamed node (audited): (what happened, whether it worked)."""
    try:
        services.ctx.registry.forget(node)
        outcome, ok = "removed from the cluster view", True
    except (KeyError, ValueError) as e:
        outcome, ok = str(e.args[0]) if e.args else str(e), False
    services.audit.record("remove_node", actor=actor, address=address, node=node, ok=ok, outcome=outcome)
    return outcome, ok


# -- startup parameters (slaves) ----------------------------------------------------------------


def _startup_page(call: Call, values: dict[str, str], errors: dict[str, str], code: int = 200) -> Page:
    if call.services.ctx.role == "standalone":
        return Page("portal/join.html", {"values": values, "errors": errors}, code=code)
    return Page("portal/startup.html", {"values": values, "errors": errors, "fields": FIELDS}, code=code)


async def startup_page(call: Call) -> Reply:
    params = call.services.ctx.startup_params
    if params is None:
        return Error(404, "Not found", "This node has no startup parameters to edit here.")
    values = await call.services.in_thread(params.load)
    return _startup_page(call, {f: values.get(f, "") for f in FIELDS}, {})


async def save_startup(call: Call) -> Reply:
    params = call.services.ctx.startup_params
    if params is None:
        return Error(404, "Not found", "This node has no startup parameters to edit here.")
    values = {f: call.form.get(f) for f in FIELDS}
    try:
        saved = await call.services.in_thread(params.save, values)
    except StartupParamError as e:
        return _startup_page(call, values, {e.field: e.message}, code=422)
    call.services.audit.record("startup_params", actor=call.account, address=call.address, params=saved)
    call.session.flash("ok", "Startup parameters saved; they take effect when the node restarts.")
    return Redirect("/node/startup")


async def join_cluster(call: Call) -> Reply:
    """A standalone node becomes a slave: its key and startup parameters are saved, then it restarts."""
    ctx = call.services.ctx
    params = ctx.startup_params
    if params is None or ctx.role != "standalone":
        return Error(404, "Not found", "Only a standalone node joins a cluster from here.")
    form = call.form
    values = {"master": form.get("master").strip(), "master_fingerprint": form.get("master_fingerprint").strip(),
              "node_name": form.get("node_name").strip()}
    try:
        saved = await call.services.in_thread(params.join, values["master"], form.get("activation_key"),
                                              fingerprint=values["master_fingerprint"], node_name=values["node_name"])
    except StartupParamError as e:
        return _startup_page(call, values, {e.field: e.message}, code=422)
    call.services.audit.record("join_cluster", actor=call.account, address=call.address, master=saved["master"])
    if not form.checked("restart"):
        call.session.flash("ok", f"Saved: at its next start this node is a slave of {saved['master']}.")
        return Redirect("/node/startup")
    call.services.audit.record("restart", actor=call.account, address=call.address)
    params.restart()
    return Page("portal/restarting.html", {"joining": saved["master"]})


async def restart(call: Call) -> Reply:
    params = call.services.ctx.startup_params
    if params is None:
        return Error(404, "Not found", "This node cannot be restarted from here.")
    call.services.audit.record("restart", actor=call.account, address=call.address)
    params.restart()
    return Page("portal/restarting.html", {})


ROUTES: list[Route] = [
    route("GET", "/cluster", cluster_page),
    route("GET", "/cluster/nodes.json", cluster_json),
    route("POST", "/cluster/task", send_task),
    route("GET", "/node/startup", startup_page),
    route("POST", "/node/startup", save_startup),
    route("POST", "/node/restart", restart),
    route("POST", "/node/join", join_cluster),
]

__all__ = ["ROUTES", "cluster_view", "remove_node", "run_task"]
