"""Write to a plain TCP transport at once when nothing is queued in front of the bytes.

Twisted's `transport.write` queues the bytes, registers the socket for writability (epoll_ctl),
sends on the next reactor turn and unregisters it again (epoll_ctl): three system calls and a
loop iteration for what is, for a small response, one `send` that always succeeds at once. A
proxy writes twice per request (the head upstream, the response downstream), so this is a large
part of its CPU time per small request.

`write_now(transport, data)` sends directly when the transport is a plain TCP connection with an
empty write buffer (so order cannot change), and hands whatever the kernel did not take (or any
error) to `transport.write`, which then behaves exactly as usual: buffering, producers, errors
and closes stay Twisted's. While a pull (non-streaming) producer is registered every write goes
through Twisted's buffer, since draining that buffer is what asks the producer for more. Any other transport (TLS, PROXY-protocol wrappers, test fakes) is
written the usual way.

`OutputBatch` gathers what one protocol callback writes (a response head and the body that came
in the same read) into a single send, as Twisted's own buffer did.
"""

from __future__ import annotations

from twisted.internet import tcp

_Plain = tcp.Connection


def write_now(transport, data: bytes) -> None:
    if (
        isinstance(transport, _Plain)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "_aborting", False)
        # A pull producer is asked for more only when Twisted's buffer drains: keep it in the loop.
        and (transport.producer is None or transport.streamingProducer)
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
        and data
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the queued write below meets the same error and reports it Twisted's way
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class OutputBatch:
    """Writes held while a batch is open and sent as one when it closes (see `ClientConnection`)."""

    __slots__ = ("pieces",)

    def __init__(self) -> None:
        self.pieces: list[bytes] | None = None

    def begin(self, transport) -> bool:
        """Open a batch; False if one is open already or `transport` is not plain TCP (TLS and
        wrappers drop what is written after a close, and a batch may outlive a close)."""
        if self.pieces is not None or not isinstance(transport, _Plain) or transport.TLS:
            return False
        self.pieces = []
        return True

    def hold(self, data: bytes) -> bool:
        """Keep `data` for the open batch; False if no batch is open."""
        pieces = self.pieces
        if pieces is None:
            return False
        pieces.append(data)
        return True

    def end(self, transport) -> None:
        """Send what was held and close the batch (a no-op if it is closed already)."""
        pieces, self.pieces = self.pieces, None
        if pieces and transport is not None:
            write_now(transport, pieces[0] if len(pieces) == 1 else b"".join(pieces))
