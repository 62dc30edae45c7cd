"""Whether a socket has something to read right now, without raising on the usual answer (no).

A pooled origin connection is checked before it carries a new request (`UpstreamConnection.
unread_bytes_waiting`): late bytes or an end of stream that arrived while it was idle would
otherwise be read as the next response. A non-blocking `recv(MSG_PEEK)` answers that, but its
usual answer, "nothing", comes back as a `BlockingIOError` that Python builds and unwinds on every
request (about twice the cost of the call itself). `poll(2)` with a zero timeout asks the kernel the
same question: readable means data waiting, the peer's end of stream (POLLIN/POLLHUP) or a pending
error (POLLERR), which are exactly the cases in which the peek returned bytes, returned b"" or
raised something other than `BlockingIOError`. An invalid descriptor (POLLNVAL) also counts as
"not reusable".

One poll object serves every check (the reactor thread alone calls this); a descriptor is
registered only for the length of one check.
"""

from __future__ import annotations

import select
import socket

_POLL = select.poll()
_EVENTS = select.POLLIN | select.POLLPRI


def readable_now(sock: socket.socket) -> bool:
    """True when reading `sock` would not block: data, end of stream or an error is waiting."""
    fd = sock.fileno()
    if fd < 0:  # closed already: nothing to reuse
        return True
    poller = _POLL
    poller.register(fd, _EVENTS)
    try:
        return bool(poller.poll(0))
    finally:
        poller.unregister(fd)


__all__ = ["readable_now"]
