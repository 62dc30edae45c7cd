"""The portal's twisted.web Site: status page, /health, the stylesheet, and whatever is mounted.

Every response, errors included, carries the security headers and `Server: safesquid-tw`; the
Site writes no per-request log lines (they would drown the event log).
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.web.http import datetimeToString, unquote
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from safesquid_tw.nodestate import NodeState
from safesquid_tw.pages import render_template, stylesheet
from safesquid_tw.portal.sessions import COOKIE_NAME
from safesquid_tw.portal.bodylimits import UPLOAD_BODY, body_limit, media_type
from safesquid_tw.portal.health import HealthResource
from safesquid_tw.portal.responses import (
    CSS_CONTENT_TYPE,
    SECURITY_HEADERS,
    SERVER_NAME,
    apply_standard_headers,
    error_response,
    method_not_allowed,
    not_found,
    readiness_options,
    respond,
)

PAGE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
STAR_METHODS = (b"OPTIONS",)


class StatusPage(Resource):
    """GET /: the node's state for people; OPTIONS /: readiness for load balancers."""

    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._state = state

    def render(self, request: IRequest) -> bytes:
        state = self._state
        if request.method == b"OPTIONS":
            return readiness_options(request, PAGE_METHODS, ready=state.ready)
        if request.method not in PAGE_METHODS:
            return method_not_allowed(request, PAGE_METHODS, node=state.node)
        body = render_template(
            "status.html",
            node=state.node,
            role=state.role,
            ready=state.ready,
            status=state.status,
            policy_version=state.policy_version,
            policy_digest=state.policy_digest,
            policy_source=state.policy_source,
            uptime_s=state.uptime_s,
        )
        return respond(request, body)


class StarOptions(Resource):
    """`OPTIONS *`: the server-wide readiness probe (RFC 9110 9.3.7)."""

    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._state = state

    def render(self, request: IRequest) -> bytes:
        if request.method != b"OPTIONS":
            return method_not_allowed(request, STAR_METHODS, node=self._state.node)
        return readiness_options(request, PAGE_METHODS, ready=self._state.ready)


class Stylesheet(Resource):
    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._state = state

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, (b"GET", b"HEAD"), node=self._state.node)
        return respond(request, stylesheet(), content_type=CSS_CONTENT_TYPE, cache_control=b"public, max-age=300")


class NotFound(Resource):
    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._state = state

    def render(self, request: IRequest) -> bytes:
        return not_found(request, node=self._state.node)


class _Directory(Resource):
    """A folder whose unknown children are our 404 page rather than twisted.web's."""

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._not_found = NotFound(state)

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return self._not_found

    def render(self, request: IRequest) -> bytes:  # the folder itself, e.g. /static/
        return self._not_found.render(request)


class PortalRoot(_Directory):
    def __init__(self, state: NodeState) -> None:
        super().__init__(state)
        self.state = state
        self.star = StarOptions(state)
        static = _Directory(state)
        static.putChild(b"style.css", Stylesheet(state))
        self.putChild(b"", StatusPage(state))
        self.putChild(b"health", HealthResource(state))
        self.putChild(b"static", static)


MAX_BODY_BYTES = UPLOAD_BODY


class PortalRequest(Request):
    """twisted.web's Request with our headers on every response and our pages for failures.

    The body limit (bodylimits.py) is decided when the head is complete: a body declared larger
    is refused with 413 and the connection closed before any of it is read; a chunked body is
    refused as soon as its count passes the limit. A multipart form is not parsed here (that
    would be on the reactor thread): the portal parses it in a worker thread (`multipart_pending`).
    """

    _body_bytes = 0
    _body_limit = MAX_BODY_BYTES
    _refused = False
    multipart_pending = False

    def gotLength(self, length: int | None) -> None:
        self._body_limit = self._limit_from_head()
        if length is not None and length > self._body_limit:
            self._refuse_body()
            return
        super().gotLength(length)

    def _limit_from_head(self) -> int:
        path = (getattr(self.channel, "_path", None) or b"/").split(b"?", 1)[0]
        content_type = self.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        return body_limit(path, content_type, authenticated=self._has_credentials())

    def _has_credentials(self) -> bool:
        services = getattr(getattr(self.channel, "site", None), "portal_services", None)
        if services is None:
            return False
        cookie = self.received_cookies.get(COOKIE_NAME)
        if cookie and services.sessions.get(cookie.decode("ascii", "replace")) is not None:
            return True
        header = (self.requestHeaders.getRawHeaders(b"authorization", [b""])[0] or b"").decode("latin-1")
        scheme, _, value = header.strip().partition(" ")
        return scheme.lower() == "bearer" and services.tokens.authenticate(value.strip()) is not None

    def _refuse_body(self) -> None:
        """413 now, from the head alone; the connection closes without reading the body."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        body = (f"413 Content Too Large: this request may carry at most {self._body_limit} bytes.\n").encode()
        head = [b"HTTP/1.1 413 Content Too Large", b"Content-Type: text/plain; charset=utf-8",
                b"Content-Length: %d" % len(body), b"Connection: close", b"Cache-Control: no-store",
                b"Server: " + SERVER_NAME]
        head += [name + b": " + value for name, value in SECURITY_HEADERS]
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        transport.loseConnection()  # stops reading: the rest of the body stays in the kernel

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._body_limit:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        ctype = self.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        if command == b"POST" and media_type(ctype) == b"multipart/form-data":
            self.multipart_pending = True
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Replaces Request.process: its `OPTIONS *` shortcut always answers 200, whatever the
        # node's readiness, and it sets twisted.web's version as the Server header. (The portal
        # uses no response encoders, the one other thing Request.process handles.)
        self.site = self.channel.site
        self.setHeader(b"Date", datetimeToString())
        apply_standard_headers(self)
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        try:
            if self.path == b"*":
                resource = self.site.resource.star
            else:
                resource = self.site.getResourceFor(self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> Failure:
        self._log.failure("portal request {method} {uri} failed", failure=reason,
                          method=self.method, uri=self.uri)
        if self.startedWriting:
            # Part of a response is out already; the connection cannot carry a clean error.
            self.loseConnection()
            return reason
        apply_standard_headers(self)
        body = error_response(
            self,
            status=500,
            title="Internal error",
            detail="The portal could not produce this page. The event log has the details.",
            node=_node_name(self.site),
        )
        self.write(body)
        self.finish()
        return reason


def _node_name(site: Site) -> str:
    # On the error path: never fail again because the root is not the usual one.
    state = getattr(site.resource, "state", None)
    return state.node if state is not None else "-"


class PortalSite(Site):
    noisy = False  # no "Starting factory" lines
    displayTracebacks = False

    def log(self, request: Any) -> None:
        """No access log line per portal request: the event log is for events."""


def make_portal_site(
    state: NodeState,
    *,
    extra: dict[bytes, Resource] | None = None,
    reactor: Any = None,
) -> Site:
    """The portal Site; `extra` mounts more resources at the root (b"api" -> /api/...)."""
    root = PortalRoot(state)
    for path, child in (extra or {}).items():
        root.putChild(path, child)
    kwargs = {} if reactor is None else {"reactor": reactor}
    return PortalSite(root, requestFactory=PortalRequest, **kwargs)


__all__ = ["MAX_BODY_BYTES", "PortalRequest", "PortalRoot", "PortalSite", "StatusPage", "make_portal_site"]
