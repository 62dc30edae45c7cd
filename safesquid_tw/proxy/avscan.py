"""Anti-virus scanning of downloads and uploads: bodies held until the ICAP verdict.

`hold_download` is called by `Exchange.upstream_head`: a response body the policy wants scanned
is held (`HeldBody`: memory up to a bound, then a temporary file) while the origin sends it; then
the scanner's verdict releases it, replaces it, or turns it into the proxy's block page.

`hold_upload` is called by `Exchange.start`: the request body is held before any connection to
the origin is made, so nothing of an infected upload, not even its head, reaches the origin.

Both paths are the same for plain HTTP and for requests decrypted by TLS inspection: they look at
the exchange only, never at the scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from safesquid_tw.icap.holding import HeldBody
from safesquid_tw.icap.scanner import Verdict
from safesquid_tw.proxy import http1
from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.headers import strip_hop_by_hop

if TYPE_CHECKING:
    from safesquid_tw.proxy.forward import Exchange

log = Logger()

RULE = "antivirus"
PIECE = 65536
_FRAMING_FIELDS = (b"content-length", b"transfer-encoding")


def _extension(path: str) -> str:
    path = path.split("?", 1)[0].rsplit("/", 1)[-1]
    _, dot, ext = path.rpartition(".")
    return ext.lower() if dot and len(ext) <= 16 else ""


def _without_framing(headers) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() not in _FRAMING_FIELDS]


def _clean_fields(headers) -> list[tuple[bytes, bytes]]:
    """A scanner's header fields, minus any that could not be written back safely (folded lines)."""
    return [(n, v) for n, v in headers if not any(c in n + v for c in (b"\r", b"\n", b"\0"))]


def _request_head_for_scan(request_bytes: bytes, size: int | None) -> bytes:
    """The upstream request head as the scanner sees it: the body is decoded (ICAP chunking is
    the only framing), so the head declares its decoded length and no transfer coding."""
    lines = request_bytes.split(b"\r\n")
    kept = [line for line in lines[1:] if line and line.split(b":", 1)[0].strip().lower() not in
            (*_FRAMING_FIELDS, b"expect")]
    if size is not None:
        kept.append(b"Content-Length: %d" % size)
    return b"\r\n".join([lines[0], *kept]) + b"\r\n\r\n"


def _verdict_detail(verdict: Verdict) -> str:
    return f"virus found: {verdict.threat}"


def _unscanned_detail(verdict: Verdict) -> str:
    return f"antivirus: not scanned ({verdict.reason})"


@implementer(IPullProducer)
class _Pump:
    """Feeds a held body, piece by piece, as fast as a transport takes it."""

    def __init__(self, body: HeldBody, deliver, finished, is_gone) -> None:
        self.body = body
        self.offset = 0
        self.deliver = deliver
        self.finished = finished
        self.is_gone = is_gone
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        if self.is_gone():
            self.stopped = True
            return
        data = self.body.read(self.offset, PIECE)
        if data:
            self.offset += len(data)
            self.deliver(data)
            return
        self.stopped = True
        self.finished()

    def stopProducing(self) -> None:
        self.stopped = True


class _Hold:
    def __init__(self, exchange: "Exchange", rules) -> None:
        self.exchange = exchange
        self.rules = rules
        self.scanner = exchange.conn.factory.antivirus
        self.body = HeldBody()
        self.holding = True
        self.done_receiving = False

    @property
    def gone(self) -> bool:
        return self.exchange._finished

    def _record_block(self, verdict_detail: str) -> None:
        ctx = self.exchange.ctx
        ctx.action = "deny"
        ctx.rule = RULE
        ctx.detail = verdict_detail

    # What is being held, for the log line of a scan that failed inside the node.
    what = "a transfer"

    def _scan(self, mode: bytes, request_head: bytes, response_head: bytes | None) -> None:
        """Send the held body to the scanner; its verdict (or an internal failure, taken as
        "unscanned") goes to `_verdict`."""
        d = self.scanner.scan(self.rules, mode, request_head, response_head, self.body,
                              _extension(self.exchange.ctx.target.path))
        d.addCallback(self._verdict)
        d.addErrback(self._scan_error)

    def _scan_error(self, reason) -> None:
        log.failure("anti-virus verdict for {what}", reason, what=self.what)
        if not self.gone:
            self._verdict(Verdict("unscanned", reason="internal error"))

    def _verdict(self, verdict: Verdict) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------


def hold_download(exchange: "Exchange", head: http1.ResponseHead, framing: http1.Framing) -> "DownloadHold | None":
    """Start holding a response body for its scan, or None when it is not scanned."""
    ctx = exchange.ctx
    rules = ctx.policy.compiled.antivirus
    if not rules.downloads or framing.kind == "none" or exchange.upgrade:
        return None
    if rules.skips(head.get(b"content-type")):
        return None
    hold = DownloadHold(exchange, rules, head, framing)
    if framing.kind == "length":
        if framing.length == 0:
            return None
        if framing.length > rules.max_scan_bytes:
            if rules.oversize_action == "allow":
                ctx.detail = f"antivirus: not scanned (larger than {rules.max_scan_bytes} bytes)"
                return None
            hold.block_oversize()
    return hold


class DownloadHold(_Hold):
    what = "a download"

    def __init__(self, exchange, rules, head: http1.ResponseHead, framing: http1.Framing) -> None:
        super().__init__(exchange, rules)
        self.head = head
        self.framing = framing
        self.releasing = False
        self.pump: _Pump | None = None

    def block_oversize(self) -> None:
        exchange = self.exchange
        limit = self.rules.max_scan_bytes
        self._record_block(f"antivirus: larger than {limit} bytes, not scanned")
        exchange._abandon_upstream()
        exchange.conn.respond_blocked(exchange.ctx, rule=RULE, reason=f"downloads larger than {limit} bytes cannot be "
                                      "scanned for viruses", close=True)
        exchange._end(close=True)
        self.body.close()

    def data(self, data: bytes) -> None:
        if self.gone:
            return
        if self.releasing:
            self.body.append(data)  # arrived while the held part is still going out
            return
        if self.body.size + len(data) > self.rules.max_scan_bytes:
            self.body.append(data)
            if self.rules.oversize_action == "block":
                self.block_oversize()
            else:
                self.exchange.ctx.detail = f"antivirus: not scanned (larger than {self.rules.max_scan_bytes} bytes)"
                self.release(streaming_on=True)
            return
        self.body.append(data)

    def done(self) -> None:
        exchange = self.exchange
        self.done_receiving = True
        if self.releasing:
            # The origin finished while the held part is still going out: its connection is
            # back in the pool, so forget it (the pool resumes its reading itself).
            exchange.upstream = None
            return
        # The origin connection goes back to the pool now; only the held copy is left.
        exchange.upstream = None
        head = self.head
        headers = _without_framing(strip_hop_by_hop(head.headers))
        headers.append((b"Content-Length", b"%d" % self.body.size))
        response_head = http1.serialize_response_head(head.status, head.reason, headers, head.version)
        self._scan(b"RESPMOD", _request_head_for_scan(exchange.request_bytes, None), response_head)

    def _verdict(self, verdict: Verdict) -> None:
        exchange = self.exchange
        if self.gone:
            self.body.close()
            return
        ctx = exchange.ctx
        close = ctx.client_close or not exchange._body_done
        if verdict.outcome == "clean":
            self.release(streaming_on=False)
        elif verdict.outcome == "infected":
            self._record_block(_verdict_detail(verdict))
            exchange.conn.respond_blocked(ctx, rule=RULE, reason=f"the download contains a virus: {verdict.threat}",
                                          close=close)
            self.body.close()
            exchange._end(close=close)
        elif verdict.outcome == "replaced":
            self._replace(verdict, close)
        elif self.rules.fail_mode == "open":
            ctx.detail = _unscanned_detail(verdict)
            self.release(streaming_on=False)
        else:
            self._unavailable(verdict)

    def _unavailable(self, verdict: Verdict) -> None:
        exchange = self.exchange
        ctx = exchange.ctx
        ctx.rule = RULE
        ctx.action = "error"
        detail = "virus scanning is unavailable, so this download was refused"
        exchange.conn.respond_failure(ctx, ProxyFailure(503, "proxy_internal_error", detail))
        ctx.detail = f"antivirus: scanning unavailable ({verdict.reason})"
        self.body.close()
        exchange._end(close=True)

    def _replace(self, verdict: Verdict, close: bool) -> None:
        exchange = self.exchange
        ctx = exchange.ctx
        head = verdict.http_head
        body = verdict.body or b""
        status = head.status
        if status is None or not 200 <= status <= 599 or status in (204, 304):
            self._verdict(Verdict("unscanned", reason=f"the scanner's replacement has status {status}"))
            return
        headers = _clean_fields(_without_framing(strip_hop_by_hop(list(head.headers))))
        headers = exchange.conn.factory.add_via(headers, b"HTTP/1.1")
        headers.append((b"Content-Length", b"%d" % len(body)))
        if close:
            headers.append((b"Connection", b"close"))
        ctx.status = status
        ctx.detail = "antivirus: the scanner modified the response"
        data = http1.serialize_response_head(status, head.reason or b"OK", headers, ctx.version)
        exchange.conn.write(data if ctx.method == b"HEAD" else data + body)
        self.body.close()
        exchange._end(close=close)

    def release(self, *, streaming_on: bool) -> None:
        """Send the head and the held bytes to the client; with `streaming_on` the origin is still
        sending, and the relay goes on directly once the held bytes are out."""
        exchange = self.exchange
        conn = exchange.conn
        self.releasing = True
        framing = self.framing
        if not streaming_on and not framing.transfer_codings:
            framing = http1.Framing("length", self.body.size)
        upstream = exchange.upstream
        if upstream is not None and upstream.gate is not None:
            upstream.gate.pause("antivirus")
        exchange.upstream = None  # no producer from the origin while the held part goes out
        exchange.upstream_head(self.head, framing)
        exchange.upstream = upstream
        if exchange._finished:
            self.body.close()
            return

        def finished() -> None:
            conn.transport.unregisterProducer()
            self.holding = False
            self.releasing = False
            self.body.close()
            if exchange._finished:
                return
            if self.done_receiving:
                exchange.upstream_done()
            elif upstream is not None and upstream.gate is not None:
                conn.transport.registerProducer(upstream.gate.producer("client-full"), True)
                upstream.gate.resume("antivirus")

        def deliver(data: bytes) -> None:
            # Held bytes go out through the exchange's own relay path (framing, size limits).
            self.holding = False
            try:
                exchange.upstream_data(data)
            finally:
                self.holding = True

        self.pump = _Pump(self.body, deliver, finished, lambda: exchange._finished)
        conn.transport.registerProducer(self.pump, False)


# ---------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------


def holds_uploads(ctx) -> bool:
    """Whether a request body of this request will be held for a scan (for Expect handling)."""
    rules = ctx.policy.compiled.antivirus
    if not rules.uploads or rules.skips(ctx.head.get(b"content-type")):
        return False
    framing = ctx.framing
    if framing.kind == "length" and (framing.length == 0 or framing.length > rules.max_scan_bytes):
        return rules.oversize_action == "block" and framing.length > 0
    return framing.kind != "none"


def hold_upload(exchange: "Exchange") -> "UploadHold | None":
    """Hold the request body for its scan before the origin is contacted, or None."""
    ctx = exchange.ctx
    if not exchange.has_body or exchange.upgrade or not holds_uploads(ctx):
        rules = ctx.policy.compiled.antivirus
        framing = ctx.framing
        if rules.uploads and framing.kind == "length" and framing.length > rules.max_scan_bytes:
            ctx.detail = f"antivirus: not scanned (larger than {rules.max_scan_bytes} bytes)"
        return None
    hold = UploadHold(exchange, ctx.policy.compiled.antivirus)
    framing = ctx.framing
    if framing.kind == "length" and framing.length > hold.rules.max_scan_bytes:
        hold.block_oversize()
    return hold


class UploadHold(_Hold):
    what = "an upload"

    def __init__(self, exchange, rules) -> None:
        super().__init__(exchange, rules)
        self.released = False
        self.refusing = False
        self.pump: _Pump | None = None

    def _refuse(self, write) -> None:
        """Answer the client instead of the origin; the rest of its body is never read."""
        exchange = self.exchange
        conn = exchange.conn
        ctx = exchange.ctx
        exchange._finished = True
        if conn.exchange is exchange:
            conn.exchange = None
        write(ctx)
        self.body.close()
        conn._finish_local(ctx, close=True)

    def block_oversize(self) -> None:
        limit = self.rules.max_scan_bytes
        self._record_block(f"antivirus: upload larger than {limit} bytes, not scanned")
        self._refuse(lambda ctx: self.exchange.conn.respond_blocked(
            ctx, rule=RULE, reason=f"uploads larger than {limit} bytes cannot be scanned for viruses", close=True))

    def data(self, data: bytes) -> None:
        if self.gone or self.refusing:
            return
        self.body.append(data)
        if not self.released and self.body.size > self.rules.max_scan_bytes:
            if self.rules.oversize_action == "block":
                # The front door is in the middle of handing over body pieces: answer on the
                # next turn, dropping whatever else arrives meanwhile.
                self.refusing = True
                self.exchange.conn.factory.reactor.callLater(0, self._block_later)
            else:
                self.exchange.ctx.detail = f"antivirus: not scanned (larger than {self.rules.max_scan_bytes} bytes)"
                self.release()

    def _block_later(self) -> None:
        if not self.gone and self.exchange.conn.state != "closing":
            self.block_oversize()

    def done(self) -> None:
        self.done_receiving = True
        if self.released or self.refusing or self.gone:
            return
        exchange = self.exchange
        self._scan(b"REQMOD", _request_head_for_scan(exchange.request_bytes, self.body.size), None)

    def _verdict(self, verdict: Verdict) -> None:
        exchange = self.exchange
        if self.gone:
            self.body.close()
            return
        ctx = exchange.ctx
        if verdict.outcome == "clean":
            self.release()
        elif verdict.outcome == "infected":
            self._record_block(_verdict_detail(verdict))
            self._refuse(lambda ctx: exchange.conn.respond_blocked(
                ctx, rule=RULE, reason=f"the upload contains a virus: {verdict.threat}", close=True))
        elif verdict.outcome == "replaced":
            self._replace(verdict)
        elif self.rules.fail_mode == "open":
            ctx.detail = _unscanned_detail(verdict)
            self.release()
        else:
            ctx.rule = RULE
            ctx.action = "error"
            detail = "virus scanning is unavailable, so this upload was refused"
            self._refuse(lambda ctx: exchange.conn.respond_failure(
                ctx, ProxyFailure(503, "proxy_internal_error", detail)))
            ctx.detail = f"antivirus: scanning unavailable ({verdict.reason})"

    def _replace(self, verdict: Verdict) -> None:
        """The scanner rewrote the request: send its version (re-framed by length)."""
        exchange = self.exchange
        head = verdict.http_head
        body = verdict.body or b""
        parts = head.start_line.split(b" ")
        if len(parts) != 3:
            self._verdict(Verdict("unscanned", reason="the scanner's modified request is malformed"))
            return
        headers = _clean_fields(_without_framing(list(head.headers)))
        headers.append((b"Content-Length", b"%d" % len(body)))
        exchange.request_bytes = http1.serialize_request_head(parts[0], parts[1], headers)
        exchange._chunked_out = False
        exchange.ctx.detail = "antivirus: the scanner modified the request"
        self.body.close()
        self.body = HeldBody()
        self.body.append(body)
        self.release()

    def release(self) -> None:
        """Connect to the origin now; the held bytes go first once it is attached."""
        self.released = True
        self.exchange.conn.gate.pause("antivirus")  # the client waits until the held part is out
        self.exchange.start()

    def attached(self, upstream) -> bool:
        """Called by `Exchange._attach` after the request head went out: send the held body."""
        if not self.released or not self.holding:
            return False
        exchange = self.exchange
        conn = exchange.conn

        def finished() -> None:
            upstream.transport.unregisterProducer()
            self.body.close()
            if exchange._finished:
                return
            exchange.conn.gate.resume("antivirus")
            if self.done_receiving:
                exchange.body_end()
            else:
                upstream.transport.registerProducer(conn.gate.producer("upstream-full"), True)

        self.holding = False  # from here on, body bytes from the client go straight on
        conn.gate.resume("upstream-wait")
        self.pump = _Pump(self.body, lambda data: exchange.body_data(data), finished, lambda: exchange._finished)
        upstream.transport.registerProducer(self.pump, False)
        return True


__all__ = ["DownloadHold", "UploadHold", "hold_download", "hold_upload", "holds_uploads"]
