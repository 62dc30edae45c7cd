"""The management API under `/api/v1/`: JSON in and out, bearer tokens made in the portal.

Every answer is JSON, errors included: an unauthenticated call gets 401 (never a login page or a
redirect), an address outside the portal allow list 403, an invalid policy 422 with the
validator's path and message (and the running policy stays). docs/api.md describes each call.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import attrs
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from safesquid_tw.identity.probe import test_directory
from safesquid_tw.master.registry import TASKS
from safesquid_tw.policy import secrets as policy_secrets
from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.piecewise_json import loads_in_pieces
from safesquid_tw.policy.shadowing import policy_warnings
from safesquid_tw.portal import backup as B
from safesquid_tw.portal import reportdata as R
from safesquid_tw.portal.pages_cluster import cluster_view, remove_node, run_task
from safesquid_tw.portal.pages_history import KeysWouldChange, make_backup, restore
from safesquid_tw.portal.positions import parse_position, place_in_document
from safesquid_tw.portal.responses import JSON, respond
from safesquid_tw.portal.services import PortalServices
from safesquid_tw.portal import tls_admin
from safesquid_tw.portal.tokens import TokenInfo
from safesquid_tw.portal.worklimit import Busy
from safesquid_tw.portal.web import (
    BadForm,
    Call,
    Error,
    Form,
    Json,
    Reply,
    Route,
    client_address,
    find_route,
    json_bytes,
    request_segments,
    route,
    run_handler,
)

MAX_JSON_BODY = 64 * 1024 * 1024
LARGE_BODY = 256 * 1024  # bodies beyond this are decoded a piece at a time (policy/piecewise_json.py)


@attrs.frozen
class ApiCall(Call):
    token: TokenInfo | None = None

    @property
    def actor(self) -> str:
        assert self.token is not None
        return f"token {self.token.name} ({self.token.id})"


class ApiError(Exception):
    def __init__(self, code: int, error: str, **details: Any) -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.details = details


def _fail(code: int, error: str, **details: Any) -> Json:
    return Json({"error": error, **details}, code=code)


def _parse_json(data: bytes) -> Any:
    try:
        if len(data) > LARGE_BODY:
            # A policy of 100,000 domains is 3 MB: decoded a member at a time, so this thread
            # never holds the GIL (and the portal's reactor) for the whole of it.
            return loads_in_pieces(data, depth=4)
        return json.loads(data)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None


async def read_json(call: ApiCall) -> dict[str, Any]:
    """The request body as a JSON object, parsed in a worker thread (bounded: worklimit.py)."""
    content = call.request.content
    content.seek(0)
    data = content.read(MAX_JSON_BODY + 1)
    if len(data) > MAX_JSON_BODY:
        raise ApiError(413, f"the body is larger than {MAX_JSON_BODY} bytes")
    try:
        body = await call.services.heavy.run(_parse_json, data)
    except Busy:
        raise ApiError(503, "the portal is busy with other large requests; try again in a moment") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _version_number(value: object, name: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not int or value < 1:
        raise ApiError(400, f"'{name}' must be a version number")
    return value


def _history(call: ApiCall) -> Any:
    history = call.services.ctx.history
    if history is None:
        raise ApiError(409, "read-only: this node's policy is managed by its master",
                       master=call.services.ctx.master_address)
    return history


# -- policy --------------------------------------------------------------------------------------


async def get_policy(call: ApiCall) -> Reply:
    store = call.services.ctx.store
    current = store.current
    if current is None:
        return _fail(503, "no policy is loaded yet")
    return Json({"version": current.version, "digest": current.digest, "source": store.current_source,
                 "document": policy_secrets.redact(current.document)})


async def list_versions(call: ApiCall) -> Reply:
    history = _history(call)
    return Json({"versions": [info.as_json() for info in history.versions()]})


async def get_version(call: ApiCall) -> Reply:
    history = _history(call)
    number = _version_number(call.params["version"], "version")
    try:
        info = history.info(number)
        document = await call.services.in_thread(history.document, number)
    except KeyError as e:
        return _fail(404, str(e.args[0]))
    return Json({**info.as_json(), "document": policy_secrets.redact(document)})


async def get_diff(call: ApiCall) -> Reply:
    history = _history(call)
    old = _version_number(call.form.get("from"), "from")
    new = _version_number(call.form.get("to"), "to")
    try:
        text = await call.services.in_thread(history.diff, old, new)
    except KeyError as e:
        return _fail(404, str(e.args[0]))
    return Json({"from": old, "to": new, "diff": text})


async def post_policy(call: ApiCall) -> Reply:
    history = _history(call)
    body = await read_json(call)
    if "document" not in body:
        return _fail(400, "the body needs a 'document'")
    comment = body.get("comment", "")
    if not isinstance(comment, str):
        return _fail(400, "'comment' must be text")
    before = call.services.ctx.store.current
    # Secrets sent back as their markers keep the running version's values.
    document = policy_secrets.restore(body["document"], before.document if before is not None else None)
    # Only its number from here on: the version being replaced is freed in the policy thread.
    before_version = before.version if before is not None else None
    del before
    try:
        policy = await history.apply_async(document, by=call.actor,
                                           comment=comment or "applied through the API", source="api")
    except PolicySuperseded as e:
        return _fail(409, str(e))
    except PolicyError as e:
        current = call.services.ctx.store.current
        return _fail(422, "the policy does not validate", path=e.path, message=e.message,
                     running_version=current.version if current else None)
    changed = before_version is None or policy.version != before_version
    if changed:
        call.services.audit.record("apply", actor=call.actor, address=call.address, version=policy.version,
                                   digest=policy.digest, comment=comment, via="api")
    return Json({"version": policy.version, "digest": policy.digest, "changed": changed,
                 "warnings": [w.as_json() for w in policy_warnings(policy)]}, code=201 if changed else 200)


async def post_rule(call: ApiCall) -> Reply:
    """Add an access rule at a chosen position (`top` by default: first match decides)."""
    history = _history(call)
    body = await read_json(call)
    rule = body.get("rule")
    if not isinstance(rule, dict) or not isinstance(rule.get("name"), str):
        return _fail(400, "the body needs a 'rule' object with a 'name'")
    return await _reorder(call, history, body, rule=rule, default="top")


async def move_rule(call: ApiCall) -> Reply:
    """Move an existing access rule to `position`."""
    history = _history(call)
    body = await read_json(call)
    if "position" not in body:
        return _fail(400, "the body needs a 'position'")
    return await _reorder(call, history, body, name=call.params["name"], default="top")


async def _reorder(call: ApiCall, history: Any, body: dict[str, Any], *, default: str,
                   rule: dict[str, Any] | None = None, name: str | None = None) -> Reply:
    current = call.services.ctx.store.current
    if current is None:
        return _fail(503, "no policy is loaded yet")
    try:
        position = parse_position(body.get("position", default))
    except ValueError as e:
        return _fail(400, str(e))
    comment = body.get("comment") or ""
    if not isinstance(comment, str):
        return _fail(400, "'comment' must be text")
    document = copy.deepcopy(current.document)
    rules = document.setdefault("access", {}).setdefault("rules", [])
    names = [r["name"] for r in rules]
    if rule is not None:
        if rule["name"] in names:
            return _fail(409, f"there is already a rule {rule['name']!r}")
        rules.append(rule)
        index, what = len(rules) - 1, f"rule {rule['name']!r} added"
    else:
        if name not in names:
            return _fail(404, f"there is no rule {name!r}")
        index, what = names.index(name), f"rule {name!r} moved"
    try:
        document = place_in_document(document, ("access", "rules"), index, position)
        policy = history.apply(document, by=call.actor, comment=comment or f"{what} through the API", source="api")
    except PolicyError as e:
        return _fail(422, "the policy does not validate", path=e.path, message=e.message,
                     running_version=current.version)
    changed = policy.version != current.version
    if changed:
        call.services.audit.record("apply", actor=call.actor, address=call.address, version=policy.version,
                                   digest=policy.digest, comment=comment or what, via="api")
    order = [r["name"] for r in policy.document["access"]["rules"]]
    return Json({"version": policy.version, "digest": policy.digest, "changed": changed, "rules": order,
                 "warnings": [w.as_json() for w in policy_warnings(policy)]},
                code=201 if changed else 200)


async def post_rollback(call: ApiCall) -> Reply:
    history = _history(call)
    body = await read_json(call)
    number = _version_number(body.get("version"), "version")
    comment = body.get("comment") or ""
    if not isinstance(comment, str):
        return _fail(400, "'comment' must be text")
    before = call.services.ctx.store.current
    before_version = before.version if before is not None else None
    del before  # only its number: the replaced version is freed in the policy thread
    try:
        policy = await history.rollback_async(number, by=call.actor, comment=comment)
    except PolicySuperseded as e:
        return _fail(409, str(e))
    except KeyError as e:
        return _fail(404, str(e.args[0]))
    except PolicyError as e:
        return _fail(422, "that version no longer validates", path=e.path, message=e.message)
    changed = before_version is None or policy.version != before_version
    if changed:
        call.services.audit.record("rollback", actor=call.actor, address=call.address, to_version=number,
                                   version=policy.version, digest=policy.digest, comment=comment, via="api")
    return Json({"version": policy.version, "digest": policy.digest, "rolled_back_to": number, "changed": changed},
                code=201 if changed else 200)


# -- cluster -------------------------------------------------------------------------------------


async def get_cluster(call: ApiCall) -> Reply:
    return Json(cluster_view(call.services.ctx))


async def post_task(call: ApiCall) -> Reply:
    ctx = call.services.ctx
    if ctx.registry is None:
        return _fail(409, "only a master sends tasks to nodes")
    task = (await read_json(call)).get("task")
    if task not in TASKS:
        return _fail(422, f"'task' must be one of {', '.join(TASKS)}")
    node = call.params["node"]
    if node not in ctx.registry.connected_names():
        return _fail(404, f"node {node!r} is not connected")
    outcome, ok = await run_task(call.services, node, task, actor=call.actor, address=call.address)
    return Json({"node": node, "task": task, "ok": ok, "outcome": outcome}, code=200 if ok else 502)


async def delete_node(call: ApiCall) -> Reply:
    ctx = call.services.ctx
    if ctx.registry is None:
        return _fail(409, "only a master has a cluster view")
    node = call.params["node"]
    if node not in ctx.registry.records:
        return _fail(404, f"no node named {node!r}")
    outcome, ok = remove_node(call.services, node, actor=call.actor, address=call.address)
    return Json({"node": node, "removed": ok, "outcome": outcome}, code=200 if ok else 409)


# -- reports -------------------------------------------------------------------------------------


def _reports(call: ApiCall) -> Any:
    reports = call.services.ctx.reports
    if reports is None:
        raise ApiError(404, "this node keeps no reports (a slave ships its records to its master)")
    return reports


def _params(call: ApiCall) -> dict[str, str]:
    return {k: call.form.get(k) for k in call.form.fields}


async def get_dashboard(call: ApiCall) -> Reply:
    reports = _reports(call)
    try:
        period = R.parse_period(_params(call), call.services.now())
    except R.ReportQueryError as e:
        return _fail(400, e.message, parameter=e.parameter)
    node = call.form.get("node") or None
    data = await call.services.in_thread(R.dashboard_data, reports, period, node)
    return Json(R.dashboard_json(data, period, node))


async def get_requests(call: ApiCall) -> Reply:
    reports = _reports(call)
    params = _params(call)
    try:
        period = R.parse_period(params, call.services.now())
        filters, page = R.parse_search(params)
        size_text = params.get("page_size") or str(R.PAGE_SIZE)
        if not size_text.isdigit() or not 1 <= int(size_text) <= 1000:
            raise R.ReportQueryError("page_size", "must be 1 to 1000")
    except R.ReportQueryError as e:
        return _fail(400, e.message, parameter=e.parameter)
    found = await call.services.in_thread(R.search_data, reports, period, filters, page, int(size_text))
    return Json({**period.as_json(), "filters": filters, **found})


# -- backup --------------------------------------------------------------------------------------


async def post_directory_test(call: ApiCall) -> Reply:
    """Bind with the running version's directory settings, find a user, list their groups."""
    body = await read_json(call)
    user = body.get("user")
    password = body.get("password")
    if not isinstance(user, str) or not user.strip() or len(user) > 256:
        return _fail(400, "'user' must be a user name")
    if password is not None and not isinstance(password, str):
        return _fail(400, "'password' must be text")
    current = call.services.ctx.store.current
    if current is None:
        return _fail(503, "no policy is loaded yet")
    result = await call.services.in_thread(test_directory, current.document, user.strip(), password or None)
    return Json(result)


async def get_backup(call: ApiCall) -> Reply:
    _history(call)
    document = await make_backup(call.services)
    call.services.audit.record("backup", actor=call.actor, address=call.address, versions=len(document["versions"]),
                               via="api")
    return Json(document)


async def post_restore(call: ApiCall) -> Reply:
    _history(call)
    content = call.request.content
    content.seek(0)
    data = content.read(MAX_JSON_BODY + 1)
    if len(data) > MAX_JSON_BODY:
        return _fail(413, f"the body is larger than {MAX_JSON_BODY} bytes")
    try:
        result = await restore(call.services, data, by=call.actor, address=call.address,
                               replace_keys=call.form.checked("replace_keys"))
    except KeysWouldChange as e:
        return _fail(409, str(e), confirm="repeat with ?replace_keys=1 to replace the key")
    except B.BackupError as e:
        code = 409 if "fresh" in str(e) else 422
        return _fail(code, str(e))
    return Json(result)


ROUTES: list[Route] = [
    route("GET", "/api/v1/policy", get_policy),
    route("POST", "/api/v1/policy", post_policy),
    route("GET", "/api/v1/policy/versions", list_versions),
    route("GET", "/api/v1/policy/versions/{version}", get_version),
    route("GET", "/api/v1/policy/diff", get_diff),
    route("POST", "/api/v1/policy/rollback", post_rollback),
    route("POST", "/api/v1/policy/rules", post_rule),
    route("POST", "/api/v1/policy/rules/{name}/move", move_rule),
    route("GET", "/api/v1/cluster", get_cluster),
    route("POST", "/api/v1/cluster/{node}/tasks", post_task),
    route("GET", "/api/v1/reports/dashboard", get_dashboard),
    route("GET", "/api/v1/reports/requests", get_requests),
    route("POST", "/api/v1/directory/test", post_directory_test),
    route("GET", "/api/v1/backup", get_backup),
    route("POST", "/api/v1/restore", post_restore),
    *tls_admin.API_ROUTES,
    route("DELETE", "/api/v1/cluster/{node}", delete_node),
]


class ApiApp(Resource):
    isLeaf = True

    def __init__(self, services: PortalServices, routes: list[Route] = ROUTES) -> None:
        super().__init__()
        self.services = services
        self.routes = routes

    def _json(self, request: IRequest, code: int, value: Any) -> bytes:
        return respond(request, json_bytes(value), code=code, content_type=JSON)

    def render(self, request: IRequest) -> bytes | int:
        services = self.services
        if not services.allow.allows(client_address(request)):
            return self._json(request, 403, {"error": "the API is not open to your network address"})
        token = self._token(request)
        if token is None:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="safesquid-tw"')
            return self._json(request, 401, {"error": "an API token is needed (Authorization: Bearer ...)"})
        chosen, params, matched = find_route(self.routes, request_segments(request), request.method)
        if not matched:
            return self._json(request, 404, {"error": "there is no API call at this address"})
        if chosen is None:
            allowed = sorted({m for r in matched for m in r.methods})
            request.setHeader(b"Allow", b", ".join(allowed))
            return self._json(request, 405, {"error": f"use {', '.join(m.decode() for m in allowed)} here"})
        try:
            form = Form.from_args(request.args or {})
        except BadForm as e:
            return self._json(request, 400, {"error": str(e)})
        call = ApiCall(request, services, None, form, params, token)
        return run_handler(request, _guarded(chosen.handler), call, _write_api_reply)

    def _token(self, request: IRequest) -> TokenInfo | None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.services.tokens.authenticate(value.strip())


def _guarded(handler: Any) -> Any:
    async def run(call: ApiCall) -> Reply:
        try:
            return await handler(call)
        except ApiError as e:
            return _fail(e.code, e.error, **e.details)

    return run


def _write_api_reply(request: IRequest, call: Call, reply: Reply) -> bytes:
    if isinstance(reply, Error):
        reply = _fail(reply.code, reply.title, detail=reply.detail)
    if isinstance(reply, Json):
        for name, value in reply.headers:
            request.setHeader(name, value)
        return respond(request, json_bytes(reply.value), code=reply.code, content_type=JSON)
    raise TypeError(f"the API answers JSON only, not {reply!r}")


__all__ = ["ROUTES", "ApiApp"]
