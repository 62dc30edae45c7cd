"""Back-pressure between the two sides of a relay.

Several independent reasons may want a connection to stop reading at the same time: the peer's
write buffer is full, a pipelined request waits for the previous response, a lookup is pending.
Each names its reason; the transport reads again only when no reason is left, so one side resuming
cannot undo another side's pause.
"""

from __future__ import annotations

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer, ITransport


class ReadGate:
    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport: ITransport) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._transport.resumeProducing()

    def resume_all(self) -> None:
        if self._reasons:
            self._reasons.clear()
            self._transport.resumeProducing()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def producer(self, reason: str) -> "GateProducer":
        """An IPushProducer to register on the peer's transport: its pauses land here as `reason`."""
        return GateProducer(self, reason)


@implementer(IPushProducer)
class GateProducer:
    __slots__ = ("_gate", "_reason")

    def __init__(self, gate: ReadGate, reason: str) -> None:
        self._gate = gate
        self._reason = reason

    def pauseProducing(self) -> None:
        self._gate.pause(self._reason)

    def resumeProducing(self) -> None:
        self._gate.resume(self._reason)

    def stopProducing(self) -> None:
        # The consumer went away; the owner of the connection notices that through
        # connectionLost and tears the relay down there.
        self._gate.resume(self._reason)
