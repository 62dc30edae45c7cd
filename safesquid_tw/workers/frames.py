"""Messages between a node and its workers: a 4-byte big-endian length, then one JSON object.

Parent -> worker (the worker's stdin):
  {"t": "policy", "version": int, "digest": str, "doc": {...}}   a version to serve (or only the
      sections that changed since the base version: {..., "base": str, "changed": {...}, "removed": [...]},
      workers/policydelta.py)
  {"t": "listen"}                     accept connections once the policy sent before is in force
  {"t": "drain"} / {"t": "resume"} / {"t": "hup"}                 tasks and SIGHUP
  {"t": "ca"}                                                     the inspection CA changed on disk
  {"t": "closing"}          the node is stopping: every connection closes after its response
  {"t": "ack", "segment": int}    the store has this spool segment of the worker's: delete it
Worker -> parent (the worker's stdout; its stderr carries its event log lines):
  {"t": "hello", "pid": int}
  {"t": "accepting"}                                              taking connections from now on
  {"t": "policy", "version": int | null, "error": str | null}     the version now served
  {"t": "rec", "l": str, "m": [action, status, ms, in, out], "uf"?: {...}}   one finished record:
                                      its access.log line, the figures the node counts, and the
                                      upstream failure totals when they changed
  {"t": "status", "connections": int, "requests": int, "edge": {...}, "antivirus": {...},
   "spool": {...}, "directory": {...}, "uf": {...}}                   about once a second
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable

from twisted.internet import protocol

MAX_FRAME = 256 << 20  # a policy of 10k domains is a few MiB; anything near this is a fault
LARGE_FRAME = 256 << 10  # decoded in one call, a frame this big holds the GIL a millisecond or more
_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The other side sent something that is not a frame: the pipe is closed."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Bytes in, messages out (to `deliver`), whatever the chunking of the pipe.

    With `deliver_large`, a frame of `large_at` bytes or more is handed over undecoded (a whole
    policy version: decoded in a thread, a piece at a time, by `decode_large`)."""

    def __init__(self, deliver: Callable[[dict[str, Any]], None],
                 deliver_large: Callable[[bytes], None] | None = None, large_at: int = LARGE_FRAME) -> None:
        self.deliver = deliver
        self.deliver_large = deliver_large
        self.large_at = large_at
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            (length,) = _HEADER.unpack_from(buffer)
            if length > MAX_FRAME:
                raise FrameError(f"a frame of {length} bytes")
            if len(buffer) < 4 + length:
                return
            body = bytes(buffer[4:4 + length])
            del buffer[:4 + length]
            if self.deliver_large is not None and length >= self.large_at:
                self.deliver_large(body)
                continue
            try:
                message = json.loads(body)
            except ValueError as e:
                raise FrameError(f"not JSON: {e}") from None
            if not isinstance(message, dict) or not isinstance(message.get("t"), str):
                raise FrameError("a frame without a type")
            self.deliver(message)


def decode_large(body: bytes) -> dict[str, Any]:
    """A large frame's message (any thread), decoded a member at a time down to a policy's
    categories, so the GIL is never held for the whole of it. Raises FrameError."""
    from safesquid_tw.policy.errors import PolicyError
    from safesquid_tw.policy.piecewise_json import parse_json_in_pieces

    try:
        message = parse_json_in_pieces(body, depth=4)
    except PolicyError as e:
        raise FrameError(f"not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise FrameError("a frame without a type")
    return message


class FramedStdio(protocol.Protocol):
    """A worker's end of the pipe (twisted.internet.stdio): frames from stdin to `deliver`
    (large ones undecoded to `deliver_large`, when given)."""

    def __init__(self, deliver: Callable[[dict[str, Any]], None], lost: Callable[[], None],
                 deliver_large: Callable[[bytes], None] | None = None) -> None:
        self.reader = FrameReader(deliver, deliver_large)
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except FrameError:
            self.transport.loseConnection()

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def connectionLost(self, reason=None) -> None:
        self.lost()
