"""One forwarded request: the relay between a client connection and an origin connection.

The exchange receives the request body from the client side, holds it while the origin connection
is being made (pausing the client when too much is waiting), streams it upstream with back-pressure,
and relays the response back the same way, applying the response-side policy (MIME types, file
extensions, download size) as the head and the bytes go by. It ends with one access record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from safesquid_tw.proxy import avscan, http1, leanpath
from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.headers import names_not_forwarded, strip_hop_by_hop
from safesquid_tw.proxy.upstream import UpstreamConnection
from safesquid_tw.proxy.urlnorm import blocked_request_any

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.frontdoor import ClientConnection

log = Logger()

HOLD_LIMIT = 256 * 1024  # request bytes held while the origin connection is being made
_CONTENT_LENGTH = frozenset({b"content-length"})
_NOTHING: frozenset[bytes] = frozenset()


class Exchange:
    def __init__(self, conn: "ClientConnection", ctx: "RequestContext", upstream_head: bytes, *, body: bool) -> None:
        self.conn = conn
        self.ctx = ctx
        self.request_bytes = upstream_head
        self.has_body = body
        self.upstream: UpstreamConnection | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._body_done = not body
        self._chunked_out = ctx.framing.kind == "chunked"
        self._response_started = False
        self._response_chunked = False
        self._response_close = False
        self._sent_body = 0
        self._max_download = ctx.policy.compiled.content.max_download
        self._finished = False
        self._retried = False
        self.upgrade = False
        self._body_in_hand = False  # the whole response body was read with its head: no producer
        self.av: avscan.DownloadHold | None = None  # a response body held for its virus scan
        self.av_upload: avscan.UploadHold | None = None  # a request body held for its virus scan

    # -- connecting -----------------------------------------------------------------------
    def start(self) -> None:
        if self.av_upload is None:
            self.av_upload = avscan.hold_upload(self)
            if self.av_upload is not None:
                return  # the origin is contacted after the verdict (UploadHold.release)
        pool = self.conn.factory.pool
        key = (self.ctx.target.scheme, self.ctx.target.host, self.ctx.target.port)
        idle = None if self.upgrade else pool.take_idle(key)
        if idle is not None:
            self._attach(idle)
            return
        d = pool.connect(key)
        d.addCallbacks(self._attach, self._connect_failed)

    def _connect_failed(self, reason) -> None:
        if self._finished:
            return
        err = reason.value
        if not isinstance(err, ProxyFailure):
            log.failure("connecting upstream", reason)
            err = ProxyFailure(502, "proxy_internal_error", f"cannot reach the origin: {err}")
        self.fail(err)

    def _attach(self, upstream: UpstreamConnection) -> None:
        if self._finished:
            # The client is gone already; a fresh connection may still serve someone else.
            self.conn.factory.pool.release(upstream)
            return
        self.upstream = upstream
        upstream.start_request(self, self.request_bytes, self.ctx.method)
        if self.av_upload is not None and self.av_upload.attached(upstream):
            return
        for data in self._held:
            upstream.send_body(data)
        self._held = []
        self._held_bytes = 0
        self.conn.gate.resume("upstream-wait")
        if self._body_done:
            upstream.end_request()
        else:
            upstream.transport.registerProducer(self.conn.gate.producer("upstream-full"), True)

    # -- request body ---------------------------------------------------------------------
    def body_data(self, data: bytes) -> None:
        if self.av_upload is not None and self.av_upload.holding:
            self.av_upload.data(data)
            return
        if self._chunked_out:
            data = http1.encode_chunk(data)
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.upstream is None:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > HOLD_LIMIT:
                self.conn.gate.pause("upstream-wait")
        else:
            self.upstream.send_body(data)

    def body_end(self) -> None:
        if self.av_upload is not None and self.av_upload.holding:
            self._body_done = True
            self.av_upload.done()
            return
        self._body_done = True
        if self._chunked_out:
            self._send(http1.LAST_CHUNK)
        if self.upstream is not None:
            self.upstream.transport.unregisterProducer()
            self.upstream.end_request()

    # -- response (ResponseSink) ----------------------------------------------------------
    def upstream_interim(self, head: http1.ResponseHead) -> None:
        # 100 Continue and 103 Early Hints go to HTTP/1.1 clients; 1.0 clients cannot take them.
        if self.ctx.version == b"HTTP/1.1":
            headers = strip_hop_by_hop(head.headers)
            self.conn.write(http1.serialize_response_head(head.status, head.reason, headers))

    def upstream_head(self, head: http1.ResponseHead, framing: http1.Framing) -> None:
        ctx = self.ctx
        content = ctx.policy.compiled.content
        reason = content.blocked_response(head.get(b"content-type"), head.get(b"content-disposition"), ctx.target.match_path)
        if reason is None and ctx.target.other_paths:
            reason = blocked_request_any(content, ctx.target)
        if reason is None and self._max_download is not None and framing.kind == "length":
            if framing.length > self._max_download:
                reason = f"the download is larger than {self._max_download} bytes"
        if reason is not None:
            self._abandon_upstream()
            self.conn.respond_blocked(ctx, rule="content-security", reason=reason, close=True)
            self._end(close=True)
            return
        codings = framing.transfer_codings
        if codings and ctx.version != b"HTTP/1.1":
            # A transfer coding (gzip...) can only be declared with chunked, which HTTP/1.0 lacks.
            self.fail(ProxyFailure(502, "http_protocol_error",
                                   "the origin used a transfer coding an HTTP/1.0 client cannot take"))
            return
        ctx.status = head.status
        if self.av is None:
            self.av = avscan.hold_download(self, head, framing)
            if self.av is not None:
                return  # the head goes out with the body, after the verdict
        lean_head = leanpath.response_head(self, head, framing)
        if lean_head is not None:
            self._response_started = True
            self.conn.write(lean_head)
            self._watch_client(framing)
            return
        # The framing headers are the proxy's to set: the origin's Content-Length must not
        # travel beside ours (two lengths are exactly what request smugglers look for).
        # (A response without a body, to HEAD or a 304, keeps the origin's validated length.)
        drop = names_not_forwarded(head.values(b"connection"),
                                   also=_CONTENT_LENGTH if framing.kind != "none" else _NOTHING)
        headers = [(n, v) for n, v in head.headers if n.lower() not in drop]
        headers = self.conn.factory.add_via(headers, head.version)
        client_close = ctx.client_close or not self._body_done
        if framing.kind == "length":
            headers.append((b"Content-Length", b"%d" % framing.length))
        elif framing.kind in ("chunked", "close"):
            if ctx.version == b"HTTP/1.1":
                headers.append((b"Transfer-Encoding", b", ".join((*codings, b"chunked"))))
                self._response_chunked = True
            else:
                client_close = True
        if client_close:
            headers.append((b"Connection", b"close"))
        elif ctx.version == b"HTTP/1.0":
            headers.append((b"Connection", b"keep-alive"))
        self._response_close = client_close
        self._response_started = True
        self.conn.write(http1.serialize_response_head(head.status, head.reason, headers, ctx.version))
        self._watch_client(framing)

    def _watch_client(self, framing: http1.Framing) -> None:
        """Pause the origin while the client's buffer is full; not needed when the whole body is
        read already (a small response in one read: it goes out at once, and the producer's
        registration and removal would cost more than the rest of its relaying)."""
        upstream = self.upstream
        if framing.kind == "none" or upstream is None or upstream.gate is None:
            return
        if framing.kind == "length" and len(upstream._buf) >= framing.length:
            self._body_in_hand = True
            return
        self.conn.transport.registerProducer(upstream.gate.producer("client-full"), True)

    def upstream_data(self, data: bytes) -> None:
        if self.upgrade:
            self.conn.write(data)
            return
        if self.av is not None and self.av.holding:
            self.av.data(data)
            return
        self._sent_body += len(data)
        if self._max_download is not None and self._sent_body > self._max_download:
            self.ctx.detail = f"download cut off: larger than {self._max_download} bytes"
            self.ctx.action = "deny"
            self.ctx.rule = "content-security"
            self._abandon_upstream()
            self._end(close=True, abort=True)
            return
        if self._response_chunked:
            self.conn.write(http1.encode_chunk(data))
        else:
            self.conn.write(data)

    def upstream_done(self) -> None:
        if self._finished:
            return
        if self.av is not None and self.av.holding:
            self.av.done()
            return
        if self._response_started and not self._body_in_hand:
            self.conn.transport.unregisterProducer()
        if self.upgrade:
            self._end(close=True)
            return
        if self._response_chunked:
            self.conn.write(http1.LAST_CHUNK)
        self.upstream = None
        self._end(close=self._response_close)

    def upstream_switched(self, head: http1.ResponseHead, rest: bytes) -> None:
        if not self.upgrade:
            self.fail(ProxyFailure(502, "http_protocol_error", "the origin switched protocols unasked"))
            return
        ctx = self.ctx
        ctx.status = 101
        headers = [(n, v) for n, v in head.headers if n.lower() not in (b"connection", b"keep-alive")]
        headers = self.conn.factory.add_via(headers, head.version)
        headers.append((b"Connection", b"upgrade"))
        self._response_started = True
        self.conn.write(http1.serialize_response_head(101, head.reason, headers))
        upstream = self.upstream
        self.conn.switch_to_tunnel(self, upstream)
        if rest:
            self.conn.write(rest)

    def upstream_failed(self, failure: ProxyFailure, *, retryable: bool) -> None:
        if self._finished:
            return
        self.upstream = None
        if self._response_started and not self.upgrade:
            self._origin_cut_short(failure)
            return
        if retryable and not self._retried and not self.has_body and not self._response_started:
            # A pooled connection the origin had just closed: try once more on a fresh one.
            self._retried = True
            d = self.conn.factory.pool.connect((self.ctx.target.scheme, self.ctx.target.host, self.ctx.target.port))
            d.addCallbacks(self._attach, self._connect_failed)
            return
        self.fail(failure)

    def _origin_cut_short(self, failure: ProxyFailure) -> None:
        """The origin stopped mid-body (closed early, reset, stalled, broke the chunking): the
        client keeps the head and the bytes that came, then a clean close, never the length's
        promise or a last chunk, so it knows the body is incomplete; no reset that could destroy
        what it has not read yet."""
        ctx = self.ctx
        ctx.transfer = "origin_incomplete"
        ctx.detail = failure.detail
        self.conn.factory.log_upstream_error(ctx, failure)
        transport = self.conn.transport
        if transport is not None:
            try:
                transport.unregisterProducer()
            except Exception:
                pass
        self._end(close=True)

    # -- endings --------------------------------------------------------------------------
    def fail(self, failure: ProxyFailure) -> None:
        if self._finished:
            return
        self._abandon_upstream()
        self.ctx.detail = failure.detail
        self.ctx.action = "error" if self.ctx.action == "allow" else self.ctx.action
        self.conn.factory.log_upstream_error(self.ctx, failure)
        if self._response_started:
            self._end(close=True, abort=True)
        else:
            self.conn.respond_failure(self.ctx, failure)
            self._end(close=True)

    def client_gone(self) -> None:
        """The client connection closed: drop the origin side and log what happened."""
        if self._finished:
            return
        if self.ctx.detail is None and not self._response_started:
            self.ctx.detail = "client closed the connection"
        if self.ctx.transfer == "complete":
            self.ctx.transfer = "client_aborted"  # left before the response was complete
        self._abandon_upstream()
        self._end(close=True)

    def _abandon_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self._response_started and self.conn.transport is not None:
                try:
                    self.conn.transport.unregisterProducer()
                except Exception:
                    pass
            upstream.abandon()

    def _end(self, *, close: bool, abort: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        self.conn.exchange_finished(self, close=close, abort=abort)
