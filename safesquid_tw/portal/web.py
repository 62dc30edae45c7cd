"""How a portal page is served: routing, the allow list, login sessions, CSRF, async replies.

Handlers are coroutines `async def handler(call) -> Reply`. Whatever they wait for (a password
check, a report query, a file in a thread) does not hold the reactor: the resource answers
NOT_DONE_YET and writes the reply when it is ready. Pages need a live session unless a route
says otherwise; every POST carries the session's CSRF token or gets 403.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _getMultiPartArgs, _MultiPartParseException
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from safesquid_tw.pages import render_template
from safesquid_tw.portal.bodylimits import MAX_FORM_FIELDS, too_many_fields
from safesquid_tw.portal.filereload import discarded_warning
from safesquid_tw.portal.responses import HTML, JSON, error_response, respond
from safesquid_tw.portal.services import PortalServices
from safesquid_tw.portal.sessions import COOKIE_NAME, Session
from safesquid_tw.portal.worklimit import Busy
from safesquid_tw.reporting.backend import StoreUnavailable

log = Logger()

CSV = b"text/csv; charset=utf-8"


# -- replies ------------------------------------------------------------------------------------


@attrs.frozen
class Page:
    template: str
    context: dict[str, Any] = attrs.field(factory=dict)
    code: int = 200


@attrs.frozen
class Redirect:
    location: str  # a path on this portal


@attrs.frozen
class Body:
    data: bytes
    content_type: bytes
    code: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Json:
    value: Any
    code: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Error:
    code: int
    title: str
    detail: str


Reply = Page | Redirect | Body | Json | Error


# -- requests -----------------------------------------------------------------------------------


class BadForm(ValueError):
    """A form or query that cannot be read at all (not UTF-8): 400."""


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@attrs.frozen
class Form:
    """Decoded form fields and query parameters (last value wins for `get`)."""

    fields: dict[str, list[str]]

    @classmethod
    def from_args(cls, args: dict[bytes, list[bytes]], *, files: bool = False) -> "Form":
        """`files`: a multipart upload, whose binary parts stay in request.args only."""
        try:
            if files:
                return cls({k.decode("utf-8"): [v.decode("utf-8") for v in vs if _is_utf8(v)] for k, vs in args.items()})
            return cls({k.decode("utf-8"): [v.decode("utf-8") for v in vs] for k, vs in args.items()})
        except UnicodeDecodeError:
            raise BadForm("the form is not UTF-8 text") from None

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1] if values else default

    def getall(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))

    def has(self, name: str) -> bool:
        return name in self.fields

    def checked(self, name: str) -> bool:
        return self.get(name) in ("on", "true", "1", "yes")


@attrs.frozen
class Call:
    request: IRequest
    services: PortalServices
    session: Session | None
    form: Form
    params: dict[str, str]

    @property
    def account(self) -> str:
        assert self.session is not None
        return self.session.account

    @property
    def address(self) -> str | None:
        return client_address(self.request)


Handler = Callable[[Call], Awaitable[Reply]]


@attrs.frozen
class Route:
    methods: tuple[bytes, ...]
    pattern: tuple[str, ...]  # path segments; "{name}" captures one segment
    handler: Handler
    login: bool = True  # a live session is needed

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params = {}
        for want, got in zip(self.pattern, segments):
            if want.startswith("{") and want.endswith("}"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def route(methods: str, path: str, handler: Handler, *, login: bool = True) -> Route:
    segments = tuple(s for s in path.strip("/").split("/")) if path != "/" else ("",)
    allowed = tuple(m.encode("ascii") for m in methods.split())
    if b"GET" in allowed and b"HEAD" not in allowed:
        allowed += (b"HEAD",)
    return Route(allowed, segments, handler, login)


def client_address(request: IRequest) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def request_segments(request: IRequest) -> list[str]:
    segments = [s.decode("utf-8", "replace") for s in (*request.prepath, *request.postpath)]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # /cluster/ is /cluster
    return segments or [""]


def find_route(routes: Sequence[Route], segments: Sequence[str],
               method: bytes) -> tuple[Route | None, dict[str, str], list[Route]]:
    """The first route for this path and method with its parameters, and every route whose
    path matches (for 405's Allow)."""
    matched = []
    for candidate in routes:
        found = candidate.match(segments)
        if found is not None:
            if method in candidate.methods:
                return candidate, found, [candidate]
            matched.append(candidate)
    return None, {}, matched


def safe_next(target: str) -> str:
    """A post-login destination: a path on this portal, never another site (`//evil`)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(
        ord(c) < 32 for c in target
    ):
        return "/"
    return target


def login_location(request: IRequest) -> str:
    return "/login?" + urlencode({"next": request.uri.decode("utf-8", "replace")})


# -- the resource -------------------------------------------------------------------------------


class PortalApp(Resource):
    """Every portal page, found by route; one leaf resource for the whole page tree."""

    isLeaf = True

    def __init__(self, services: PortalServices, routes: Sequence[Route]) -> None:
        super().__init__()
        self.services = services
        self.routes = list(routes)

    def render(self, request: IRequest) -> bytes | int:
        services = self.services
        node = services.ctx.state.node
        if not services.allow.allows(client_address(request)):
            return error_response(request, status=403, title="Not allowed",
                                  detail="The portal is not open to your network address.", node=node)
        chosen, params, matched = find_route(self.routes, request_segments(request), request.method)
        if not matched:
            session = services.sessions.get(session_cookie(request))
            if session is not None:  # an administrator keeps the portal's navigation
                call = Call(request, services, session, Form({}), {})
                return write_reply(request, call, Error(404, "Not found", "There is no page at this address."))
            return error_response(request, status=404, title="Not found",
                                  detail="There is no page at this address.", node=node)
        if chosen is None:
            allowed = sorted({m for r in matched for m in r.methods})
            request.setHeader(b"Allow", b", ".join(allowed))
            if request.method == b"OPTIONS":
                return respond(request, b"", code=204)
            return error_response(request, status=405, title="Method not allowed",
                                  detail="This address does not accept that kind of request.", node=node)
        if getattr(request, "multipart_pending", False):
            # A multipart upload is parsed in a worker thread, a bounded number at a time.
            d = defer.ensureDeferred(parse_multipart(self.services, request))
            d.addErrback(lambda reason: "the upload cannot be read")
            d.addCallback(lambda problem: self._continue(request, chosen, params, problem))
            d.addErrback(lambda reason: log.failure("portal upload {uri} failed", failure=reason, uri=request.uri))
            return NOT_DONE_YET
        return self._continue(request, chosen, params, None)

    def _continue(self, request: IRequest, chosen: Route, params: dict[str, str],
                  problem: str | None) -> bytes | int:
        services = self.services
        node = services.ctx.state.node
        deferred = getattr(request, "multipart_pending", False)

        def answer(body: bytes | int) -> bytes | int:
            # After a parse in a thread, render() has returned already: write here.
            if deferred and isinstance(body, bytes) and not request.finished:
                request.write(body)
                request.finish()
            return body

        if problem is not None:
            return answer(error_response(request, status=400, title="Bad request", detail=problem, node=node))
        if too_many_fields(request.args or {}):
            return answer(error_response(request, status=400, title="Bad request",
                                         detail=f"The form has more than {MAX_FORM_FIELDS} fields.", node=node))
        try:
            form = Form.from_args(request.args or {}, files=deferred)
        except BadForm as e:
            return answer(error_response(request, status=400, title="Bad request", detail=str(e), node=node))
        session = services.sessions.get(session_cookie(request))
        if chosen.login and session is None:
            if request.method in (b"GET", b"HEAD"):
                return answer(redirect(request, login_location(request)))
            return answer(error_response(request, status=403, title="Session expired",
                                         detail="Your session has ended. Log in again, then repeat what you did.",
                                         node=node))
        if request.method == b"POST" and chosen.login:
            assert session is not None
            if not csrf_ok(request, form, session.csrf):
                return answer(error_response(
                    request, status=403, title="Form refused",
                    detail="The form was not sent from this portal page (CSRF token missing or wrong). "
                    "Reload the page and try again.", node=node))
        call = Call(request, services, session, form, params)
        result = run_handler(request, chosen.handler, call, self.write_reply)
        return answer(result)

    def write_reply(self, request: IRequest, call: Call, reply: Reply) -> bytes:
        return write_reply(request, call, reply)


STORE_UNAVAILABLE = Error(503, "Report store unavailable",
                          "The report database cannot be reached just now. Nothing is lost: the nodes keep "
                          "their records and send them once it is back. Try again in a minute.")


def run_handler(request: IRequest, handler: Handler, call: Call,
                writer: Callable[[IRequest, Call, Reply], bytes]) -> int:
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(reply: Reply) -> None:
        if gone or request.finished:
            return
        body = writer(request, call, reply)
        request.write(body)
        request.finish()

    def failed(reason: Failure) -> None:
        if reason.check(StoreUnavailable):  # the report database is down: say so, not "500"
            log.warn("portal page {uri}: {why}", uri=request.uri, why=reason.getErrorMessage())
            if not (gone or request.finished):
                request.setHeader(b"Retry-After", b"30")
                request.write(writer(request, call, STORE_UNAVAILABLE))
                request.finish()
            return
        log.failure("portal page {uri} failed", failure=reason, uri=request.uri)
        if gone or request.finished:
            return
        body = writer(request, call, Error(500, "Internal error",
                                          "The portal could not produce this page. The event log has the details."))
        request.write(body)
        request.finish()

    d = defer.ensureDeferred(handler(call))
    d.addCallback(done)
    d.addErrback(failed)
    return NOT_DONE_YET


CSRF_HEADER = b"x-csrf-token"


def csrf_ok(request: IRequest, form: Form, expected: str) -> bool:
    """The session's CSRF token, from the form body or the X-CSRF-Token header only: a token
    in the address would end up in logs, history and Referer headers."""
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    if b"csrf" in parse_qs(query, keep_blank_values=True):
        return False
    header = request.getHeader(CSRF_HEADER)
    if header is not None:
        return hmac.compare_digest(header, expected.encode())
    return hmac.compare_digest(form.get("csrf").encode(), expected.encode())


async def parse_multipart(services: PortalServices, request: IRequest) -> str | None:
    """Parse a multipart body into request.args in a worker thread; a problem's text, or None."""
    ctype = request.getHeader(b"content-type") or b""

    def parse() -> dict[bytes, list[bytes]]:
        request.content.seek(0)
        try:
            return _getMultiPartArgs(request.content.read(), ctype)
        finally:
            request.content.seek(0)

    try:
        parsed = await services.heavy.run(parse)
    except Busy:
        return "The portal is busy with other uploads; try again in a moment."
    except _MultiPartParseException:
        return "The upload is not a valid multipart form."
    request.args.update(parsed)
    return None


def session_cookie(request: IRequest) -> str | None:
    raw = request.getCookie(COOKIE_NAME)
    return raw.decode("ascii", "replace") if raw else None


def set_session_cookie(request: IRequest, value: str, *, max_age: int | None = None) -> None:
    parts = [COOKIE_NAME + b"=" + value.encode("ascii"), b"Path=/", b"HttpOnly", b"SameSite=Strict"]
    if max_age is not None:
        parts.append(b"Max-Age=%d" % max_age)
    if request.isSecure():
        parts.append(b"Secure")
    request.responseHeaders.addRawHeader(b"Set-Cookie", b"; ".join(parts))


def redirect(request: IRequest, location: str) -> bytes:
    request.setHeader(b"Location", location.encode("utf-8"))
    return respond(request, b"", code=303)


def base_context(call: Call) -> dict[str, Any]:
    ctx = call.services.ctx
    session = call.session
    return {
        "account": session.account if session else None,
        "csrf": session.csrf if session else "",
        "flashes": session.take_flashes() if session else [],
        "role": ctx.role,
        "node": ctx.state.node,
        "read_only": ctx.read_only,
        "master_address": ctx.master_address,
        "has_reports": ctx.reports is not None,
        "has_registry": ctx.registry is not None,
        "path": "/" + "/".join(request_segments(call.request)),
        "file_reload_warning": discarded_warning(ctx.history) if session else None,
    }


def write_reply(request: IRequest, call: Call, reply: Reply) -> bytes:
    node = call.services.ctx.state.node
    if isinstance(reply, Page):
        context = base_context(call)
        context.update(reply.context)
        return respond(request, render_template(reply.template, **context), code=reply.code)
    if isinstance(reply, Redirect):
        return redirect(request, reply.location)
    if isinstance(reply, Body):
        for name, value in reply.headers:
            request.setHeader(name, value)
        return respond(request, reply.data, code=reply.code, content_type=reply.content_type)
    if isinstance(reply, Json):
        for name, value in reply.headers:
            request.setHeader(name, value)
        return respond(request, json_bytes(reply.value), code=reply.code, content_type=JSON)
    if isinstance(reply, Error):
        if call.session is not None:
            context = base_context(call)
            context.update(status=reply.code, title=reply.title, detail=reply.detail)
            return respond(request, render_template("portal/error_page.html", **context), code=reply.code)
        return error_response(request, status=reply.code, title=reply.title, detail=reply.detail, node=node)
    raise TypeError(f"not a reply: {reply!r}")


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def page_link(path: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return quote(path) + ("?" + query if query else "")


__all__ = [
    "CSV",
    "HTML",
    "Body",
    "Call",
    "Error",
    "Form",
    "Json",
    "Page",
    "PortalApp",
    "Redirect",
    "Route",
    "base_context",
    "client_address",
    "json_bytes",
    "page_link",
    "route",
    "run_handler",
    "safe_next",
    "set_session_cookie",
]
