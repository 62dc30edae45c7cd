"""Opaque tunnels: CONNECT, and Upgrade (WebSocket) once the origin has answered 101.

Bytes are spliced unchanged in both directions with back-pressure each way (a full client buffer
pauses reading from the origin and vice versa), the tunnel closes after a period with no bytes in
either direction, and the byte counts go into the access record.

Half-close is kept: when one side shuts down its sending half (TCP FIN), the proxy shuts down its
sending half toward the other side and keeps relaying the other direction until it ends too (a
client that uploads and then shuts down its write side still receives the whole answer). A reset
on either side, or the idle deadline, still ends both directions at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safesquid_tw.proxy.directwrite import write_now
from safesquid_tw.proxy.responses import ProxyFailure

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.frontdoor import ClientConnection
    from safesquid_tw.proxy.upstream import UpstreamConnection


class Tunnel:
    def __init__(self, conn: "ClientConnection", ctx: "RequestContext") -> None:
        self.conn = conn
        self.ctx = ctx
        self.upstream: UpstreamConnection | None = None
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self._ready = False
        self._closed = False
        self._client_ended = False  # the client shut down its sending half
        self._origin_ended = False  # the origin did

    def open(self) -> None:
        target = self.ctx.target
        d = self.conn.factory.pool.connect(("tunnel", target.host, target.port))
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, upstream: "UpstreamConnection") -> None:
        if self._closed:
            upstream.abandon()
            return
        self.adopt(upstream)
        self.conn.tunnel_ready(self)

    def _connect_failed(self, reason) -> None:
        if self._closed:
            return
        self._closed = True
        err = reason.value
        if not isinstance(err, ProxyFailure):
            err = ProxyFailure(502, "proxy_internal_error", f"cannot open the tunnel: {err}")
        self.conn.tunnel_failed(self, err)

    def adopt(self, upstream: "UpstreamConnection") -> None:
        self.upstream = upstream
        self._ready = True
        upstream.switch(self)
        self.conn.transport.registerProducer(upstream.gate.producer("client-full"), True)
        upstream.transport.registerProducer(self.conn.gate.producer("upstream-full"), True)

    def from_client(self, data: bytes) -> None:
        self.bytes_from_client += len(data)
        if self.upstream is not None:
            self.upstream.send_raw(data)

    def client_eof(self) -> None:
        """The client will send nothing more: pass the end on, keep the answer flowing."""
        if self._closed or self._client_ended:
            return
        self._client_ended = True
        upstream = self.upstream
        if self._origin_ended or upstream is None:
            self._close(None)
            return
        # The client's reads have ended: nothing is left for the origin's buffer to hold back.
        # (Reads are not resumed: the reactor would only find the same end again.)
        try:
            upstream.transport.unregisterProducer()
        except Exception:
            pass
        upstream.transport.loseWriteConnection()

    def upstream_eof(self) -> None:
        """The origin will send nothing more: end the client's read side of it, keep uploading."""
        if self._closed or self._origin_ended:
            return
        self._origin_ended = True
        if self._client_ended:
            self._close(None)
            return
        transport = self.conn.transport
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        transport.loseWriteConnection()

    # -- the origin side (ResponseSink in switched mode) ----------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.bytes_to_client += len(data)
        write_now(self.conn.transport, data)

    def upstream_done(self) -> None:
        self._close(None)

    def upstream_failed(self, failure: ProxyFailure, *, retryable: bool = False) -> None:
        self._close(failure.detail)

    def side_closed(self, side: str) -> None:
        self._close(f"{side} closed")

    def _close(self, detail: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        upstream, self.upstream = self.upstream, None
        if detail and self.ctx.detail is None and "closed" not in detail:
            self.ctx.detail = detail
        transport = self.conn.transport
        if transport is not None:
            try:
                transport.unregisterProducer()
            except Exception:
                pass
        if upstream is not None:
            upstream.sink = None
            try:
                upstream.transport.unregisterProducer()
            except Exception:
                pass
            upstream.close_tunnel()
        self.conn.tunnel_closed(self)
