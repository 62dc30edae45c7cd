"""Bounds on the master's control plane before (and after) a peer has authenticated.

Anyone who can reach the portal port can open a control-plane connection. Until the peer has
proved the activation key it gets little:

- a deadline (`auth_timeout`, 10 s from the TCP accept, TLS handshake included) and a byte budget
  (`auth_bytes`, 64 KiB of control-plane data) to complete the key proof, else it is closed;
- one key proof per connection (a second `hello` is refused), and failed proofs are counted per
  source address: past `max_failed_proofs` within `proof_window` seconds the source is refused
  before any key work is done, until the window passes;
- a peer that breaks the protocol (a refused class, an unknown method, an argument the contract
  or the serializer refuses, a call before login) gets one error answer and the connection is
  closed. Banana's own limits (640 KiB strings, well-formed input) stay in force after login.

Every refusal is one log line, never a traceback, and lines are rate-limited per source address
(`RefusalLog`): the first refusal of a source in a window is logged, the rest are counted and
summed up in the next line. `ControlGuard.stats()` holds the counters for the status pages and
/metrics.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.spread import pb

from safesquid_tw.cluster.jellysafety import ClusterBroker, ClusterServerFactory

log = Logger()

AUTH_TIMEOUT = 10.0
AUTH_BYTES = 64 * 1024
LOG_WINDOW = 60.0
MAX_FAILED_PROOFS = 5
PROOF_WINDOW = 60.0
MAX_SOURCES = 4096  # remembered per-source entries; the oldest are forgotten first


class ProtocolBroken(pb.Error):
    """Sent (once) to a peer that broke the control-plane protocol, just before closing."""


class RefusalLog:
    """One log line per source address per window; what was held back is counted and told."""

    def __init__(self, clock: IReactorTime, window: float = LOG_WINDOW, max_sources: int = MAX_SOURCES) -> None:
        self.clock = clock
        self.window = window
        self.max_sources = max_sources
        self._sources: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.lines = 0
        self.suppressed = 0

    def warn(self, source: str, message: str) -> bool:
        """Log `message` (already formatted) unless `source` was logged within the window."""
        now = self.clock.seconds()
        entry = self._sources.get(source)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            self.suppressed += 1
            return False
        held = entry[1] if entry is not None else 0
        self._sources[source] = [now, 0]
        self._sources.move_to_end(source)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        if held:
            message += f" ({held} more refusals of {source} in the last {self.window:g} s not logged)"
        self.lines += 1
        log.warn("{message}", message=message)
        return True


class ControlGuard:
    """The master's limits for control-plane connections, and their counters."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        auth_timeout: float = AUTH_TIMEOUT,
        auth_bytes: int = AUTH_BYTES,
        max_failed_proofs: int = MAX_FAILED_PROOFS,
        proof_window: float = PROOF_WINDOW,
        log_window: float = LOG_WINDOW,
    ) -> None:
        self.clock = clock
        self.auth_timeout = auth_timeout
        self.auth_bytes = auth_bytes
        self.max_failed_proofs = max_failed_proofs
        self.proof_window = proof_window
        self.refusals = RefusalLog(clock, log_window)
        self.refused: collections.Counter[str] = collections.Counter()  # by reason kind
        self._failed: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def refuse(self, kind: str, source: str, message: str) -> None:
        """Count a refusal of `kind` and log it (rate-limited per source)."""
        self.refused[kind] += 1
        self.refusals.warn(source, message)

    # -- failed key proofs ---------------------------------------------------------------------

    def _recent_failures(self, source: str) -> collections.deque:
        failures = self._failed.get(source)
        if failures is None:
            failures = self._failed[source] = collections.deque()
            while len(self._failed) > MAX_SOURCES:
                self._failed.popitem(last=False)
        horizon = self.clock.seconds() - self.proof_window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures

    def proof_failed(self, source: str) -> None:
        self._recent_failures(source).append(self.clock.seconds())

    def proofs_blocked(self, source: str) -> float | None:
        """Seconds until `source` may try a key proof again, or None if it may now."""
        if source not in self._failed:
            return None
        failures = self._recent_failures(source)
        if len(failures) < self.max_failed_proofs:
            return None
        return max(0.0, failures[0] + self.proof_window - self.clock.seconds())

    def stats(self) -> dict[str, Any]:
        return {
            "refused_total": sum(self.refused.values()),
            "refused": dict(self.refused),
            "log_lines": self.refusals.lines,
            "log_lines_suppressed": self.refusals.suppressed,
            "sources_throttled": sum(
                1 for source in list(self._failed) if self.proofs_blocked(source) is not None
            ),
        }


class GuardedBroker(ClusterBroker):
    """The master's broker: deadline and byte budget until login, one error then close for a
    peer that breaks the protocol."""

    accepted_at: float | None = None  # set by the portal port: when TCP accepted the connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authenticated = False
        self.closing = False
        self._unauthenticated_bytes = 0
        self._deadline = None

    @property
    def guard(self) -> ControlGuard:
        return self.factory.guard

    def source(self) -> str:
        try:
            return self.transport.getPeer().host
        except Exception:
            return "?"

    def connectionMade(self) -> None:
        super().connectionMade()
        guard = self.guard
        elapsed = 0.0 if self.accepted_at is None else guard.clock.seconds() - self.accepted_at
        self._deadline = guard.clock.callLater(max(0.0, guard.auth_timeout - elapsed), self._too_slow)

    def login_completed(self) -> None:
        """The peer proved the key: from now on only Banana's and the contract's limits apply."""
        self.authenticated = True
        self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.authenticated or self.transport is None:
            return
        self.guard.refuse(
            "auth_timeout", self.source(),
            f"closed a control-plane connection from {self.source()}: no key proof within "
            f"{self.guard.auth_timeout:g} s of connecting",
        )
        self._close(abort=True)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.authenticated:
            self._unauthenticated_bytes += len(data)
            if self._unauthenticated_bytes > self.guard.auth_bytes:
                self.guard.refuse(
                    "auth_bytes", self.source(),
                    f"closed a control-plane connection from {self.source()}: more than "
                    f"{self.guard.auth_bytes} bytes before a key proof",
                )
                self._close(abort=True)
                return
        super().dataReceived(data)

    def callExpressionReceived(self, obj) -> None:
        if self.closing:
            return  # the rest of a buffer read before the close: not another refusal
        if not self.currentDialect and obj not in self.knownDialects:
            self.guard.refuse(
                "unreadable", self.source(),
                f"closed a control-plane connection from {self.source()}: it chose no protocol this node speaks",
            )
            self._close(abort=True)
            return
        super().callExpressionReceived(obj)

    def _dropping(self, why: str) -> None:
        # ClusterBroker calls this when the input is not banana at all.
        self.guard.refuse(
            "unreadable", self.source(),
            f"closed a control-plane connection from {self.source()}: it sent what this node cannot read ({why})",
        )
        self._close(abort=True)

    def _recvMessage(self, findObjMethod, requestID, objectID, message, answerRequired, netArgs, netKw):
        if self.closing:
            return
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        try:
            target = findObjMethod(objectID)
            if target is None:
                raise pb.Error("Invalid Object ID")
            result = target.remoteMessageReceived(self, message, netArgs, netKw)
        except pb.Error as e:
            # Refusals of our own (a wrong key, a full name...): answered; the Gate decides
            # whether the connection stays.
            if answerRequired:
                self._sendError(pb.CopyableFailure(e), requestID)
            return
        except BaseException as e:  # the peer broke the protocol: one error, then close
            why = _describe(message, e)
            kind = "before_login" if not self.authenticated else "protocol"
            self.guard.refuse(
                kind, self.source(),
                f"closed a control-plane connection from {self.source()}"
                f"{'' if self.authenticated else ' (not logged in)'}: {why}",
            )
            if answerRequired:
                self._sendError(pb.CopyableFailure(ProtocolBroken(why)), requestID)
            self._close(abort=False)
            return
        if answerRequired:
            if hasattr(result, "addCallbacks"):
                result.addCallbacks(
                    self._sendAnswer, self._sendFailureOrError, callbackArgs=(requestID,), errbackArgs=(requestID,)
                )
            else:
                self._sendAnswer(result, requestID)

    def _close(self, *, abort: bool) -> None:
        self.closing = True
        self._cancel_deadline()
        transport = self.transport
        if transport is None:
            return
        if abort and hasattr(transport, "abortConnection"):
            transport.abortConnection()
        else:
            transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)


def _describe(message: str, error: BaseException) -> str:
    text = str(error).replace("\n", " ")
    if len(text) > 200:
        text = text[:200] + "..."
    return f"call {message[:64]!r} refused: {type(error).__name__}: {text}"


class GuardedServerFactory(ClusterServerFactory):
    """The master's control-plane factory: `GuardedBroker`s sharing one `ControlGuard`."""

    protocol = GuardedBroker
    noisy = False

    def __init__(self, root: object, guard: ControlGuard) -> None:
        super().__init__(root)
        self.guard = guard


__all__ = ["AUTH_BYTES", "AUTH_TIMEOUT", "ControlGuard", "GuardedBroker", "GuardedServerFactory", "RefusalLog"]
