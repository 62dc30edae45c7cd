"""Inspecting a request body before it leaves: DLP detectors over the first bytes, the upload
size limit. The body prefix is held (reading paused) until the verdict; then it is forwarded in
order with whatever arrived meanwhile, or the request gets a block page.

A mixin of `ClientConnection`.
"""

from __future__ import annotations

from twisted.internet import threads
from twisted.logger import Logger

from safesquid_tw import pages
from safesquid_tw.proxy.context import RequestContext
from safesquid_tw.proxy.responses import simple_response

log = Logger()

SCAN_IN_THREAD_ABOVE = 65536  # bytes of body prefix scanned in a worker thread rather than here


class BodyInspection:
    def _dlp_scan(self, ctx: RequestContext) -> None:
        """Scan the held body prefix; then forward it, or answer with a block page.

        Reading pauses meanwhile; a large prefix is scanned in a worker thread (a megabyte of
        adversarial digits costs a noticeable fraction of a second), a small one right here.
        Bytes that still arrive are held behind the prefix, in order.
        """
        self._dlp_scanning = True
        self.gate.pause("dlp")
        dlp = ctx.policy.compiled.dlp
        prefix = bytes(self._dlp_buffer[: dlp.scan_limit])
        if len(prefix) <= SCAN_IN_THREAD_ABOVE:
            self._dlp_scanned(dlp.scan(prefix), ctx)
            return
        d = threads.deferToThreadPool(self.factory.reactor, self.factory.auth_pool, dlp.scan, prefix)
        d.addCallbacks(self._dlp_scanned, self._dlp_failed, callbackArgs=(ctx,), errbackArgs=(ctx,))

    def _dlp_failed(self, reason, ctx: RequestContext) -> None:
        log.failure("DLP scan", reason)
        if self.ctx is ctx and self.state != "closing":
            self._dlp_buffer = None
            self._respond_error(ctx, 500, "the request body could not be scanned", "proxy_internal_error")

    def _dlp_scanned(self, hits, ctx: RequestContext) -> None:
        if self.ctx is not ctx or self.state == "closing":
            return
        self._dlp_scanning = False
        self.gate.resume("dlp")
        held, self._dlp_buffer = bytes(self._dlp_buffer), None
        if not self._apply_dlp(ctx, hits, started=True):
            return
        exchange = self.exchange
        exchange.start()
        if held:
            exchange.body_data(held)
        if self._dlp_body_done:
            self._dlp_body_done = False
            exchange.body_end()

    def _apply_dlp(self, ctx: RequestContext, hits, *, started: bool = False) -> bool:
        if not hits:
            return True
        ctx.dlp = tuple(sorted(set(ctx.dlp) | {h.detector for h in hits}))
        blocking = [h for h in hits if h.action == "block"]
        if not blocking:
            return True
        ctx.action = "deny"
        ctx.rule = f"dlp:{blocking[0].detector}"
        if started:
            self.exchange = None
        self.respond_blocked(
            ctx, rule=ctx.rule, reason=f"the request carries data that may not leave ({blocking[0].detector})", close=True
        )
        self._finish_local(ctx, close=True)
        return False

    def _upload_blocked(self, ctx: RequestContext) -> None:
        ctx.action = "deny"
        ctx.rule = "content-security"
        limit = ctx.policy.compiled.content.max_upload
        ctx.detail = f"upload larger than {limit} bytes"
        if self.exchange is not None and self.exchange is not None and self.state in ("body", "waiting"):
            exchange, self.exchange = self.exchange, None
            exchange._abandon_upstream()
            exchange._finished = True
        body = pages.render_block_page(
            url=ctx.url, rule="content-security", reason=f"uploads are limited to {limit} bytes",
            category=ctx.category, application=ctx.application, node=self.factory.node_name,
            policy_version=ctx.policy.version, client=self.client_ip, user=ctx.user,
        )
        ctx.status = 413
        self.write(simple_response(413, body, close=True, version=ctx.version))
        self._finish_local(ctx, close=True)
