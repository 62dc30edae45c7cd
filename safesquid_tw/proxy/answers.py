"""The answers the proxy gives itself: block pages, errors with Proxy-Status, 407 challenges,
OPTIONS and TRACE at Max-Forwards 0, and refusals of requests that cannot be parsed.

A mixin of `ClientConnection`: it writes to the client and ends the request there.
"""

from __future__ import annotations

from safesquid_tw import pages
from safesquid_tw.proxy import http1
from safesquid_tw.proxy.context import RequestContext
from safesquid_tw.proxy.responses import ProxyFailure, error_response, simple_response
from safesquid_tw.proxy.headers import client_wants_close

SENSITIVE_TRACE_FIELDS = frozenset({b"proxy-authorization", b"authorization", b"cookie"})
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT"


class SelfAnswers:
    def respond_blocked(self, ctx: RequestContext, *, rule: str | None, reason: str, close: bool) -> None:
        body = pages.render_block_page(
            url=ctx.url, rule=rule, reason=reason, category=ctx.category, application=ctx.application,
            node=self.factory.node_name, policy_version=ctx.policy.version if ctx.policy else None,
            client=self.client_ip, user=ctx.user,
        )
        ctx.status = 403
        ctx.detail = ctx.detail or reason
        headers = [(b"Proxy-Status", self.factory.proxy_status("http_request_denied"))]
        self.write(
            simple_response(403, body, headers=headers, close=close, version=ctx.version,
                            head_only=ctx.method == b"HEAD")
        )

    def respond_failure(self, ctx: RequestContext, failure: ProxyFailure) -> None:
        ctx.status = failure.status
        self.write(
            error_response(
                failure.status, node=self.factory.node_name, detail=failure.detail, url=ctx.url,
                error_type=failure.error_type, extra=failure.extra, close=True, version=ctx.version,
                head_only=ctx.method == b"HEAD",
            )
        )

    def _respond_error(self, ctx: RequestContext, status: int, detail: str, error_type: str, *, template: str | None = None) -> None:
        ctx.action = "error"
        ctx.detail = detail
        self.respond_failure(ctx, ProxyFailure(status, error_type, detail))
        self._finish_local(ctx, close=True)

    def _challenge(self, ctx: RequestContext) -> None:
        realm = ctx.policy.compiled.realm.replace("\\", "\\\\").replace('"', '\\"')
        ctx.action = "auth"
        ctx.status = 407
        ctx.detail = ctx.detail or "credentials required"
        close = self._must_close(ctx)
        self.write(
            error_response(
                407, node=self.factory.node_name, detail="This proxy needs your user name and password.",
                url=ctx.url, close=close, version=ctx.version, head_only=ctx.method == b"HEAD",
                headers=self._challenge_fields(ctx, realm),
            )
        )
        self._finish_local(ctx, close=close)

    def _challenge_fields(self, ctx: RequestContext, realm: str) -> list[tuple[bytes, bytes]]:
        basic = (b"Proxy-Authenticate", b'Basic realm="%s", charset="UTF-8"' % realm.encode("utf-8"))
        if ctx.policy.compiled.negotiate and self.factory.negotiate is not None:
            # Kerberos first: clients pick the first scheme they can do; Basic stays the fallback.
            return [(b"Proxy-Authenticate", b"Negotiate"), basic]
        return [basic]

    def _answer_max_forwards(self, ctx: RequestContext, head: http1.RequestHead) -> None:
        ctx.status = 200
        if head.method == b"TRACE":
            echoed = [(n, v) for n, v in head.headers if n.lower() not in SENSITIVE_TRACE_FIELDS]
            body = http1.serialize_request_head(head.method, head.target, echoed, head.version)
            self.write(simple_response(200, body, content_type=b"message/http", close=self._must_close(ctx), version=ctx.version))
        else:
            self.write(
                simple_response(
                    200, b"", content_type=b"text/plain",
                    headers=[(b"Allow", ALLOWED_METHODS)],
                    close=self._must_close(ctx), version=ctx.version,
                )
            )
        self._finish_local(ctx)

    def _answer_options(self, head: http1.RequestHead) -> None:
        close = client_wants_close(head.version, head.headers) or http1.request_framing(head).kind != "none"
        self.write(
            simple_response(200, b"", content_type=b"text/plain",
                            headers=[(b"Allow", ALLOWED_METHODS)],
                            close=close, version=head.version)
        )
        if close:
            self.state = "closing"
            self.send_output_now()
            self.transport.loseConnection()

    def _must_close(self, ctx: RequestContext) -> bool:
        # A request whose body we will not read leaves the connection in an unknown place. So does
        # a CONNECT the proxy answers itself: what the client sent behind it (a TLS ClientHello...)
        # was meant for the tunnel and must never be read as the next request.
        return ctx.client_close or ctx.framing.kind != "none" or ctx.method == b"CONNECT"

    def _reject(self, status: int, detail: str, error_type: str) -> None:
        """A request that cannot be parsed: answer, close, never look at the rest of the bytes."""
        if self.state == "closing":
            return
        ctx = self.ctx if self.state in ("body", "hold") else None
        self.state = "closing"
        self._disarm()
        self.write(error_response(status, node=self.factory.node_name, detail=detail, error_type=error_type, close=True))
        self.factory.log_rejected(self, status, detail, ctx)
        if ctx is None and self.tls_session is not None:
            self.tls_session.rejected(self, status, detail)
        self.send_output_now()  # the answer and its record before the close
        self.transport.loseConnection()
