"""What Perspective Broker may (un)serialize on the control plane: plain values and nothing else.

Jelly, PB's serializer, can rebuild instances of any class it is allowed to import. Twisted's
default options (`jelly.globalSecurity`) accept every type name containing a dot as long as its
module is allowed, and every class any module in the process registered with
`setUnjellyableForClass`. The control plane needs much less (see `wire`): None, bools, ints,
floats, bytes, str, lists, tuples, dicts, references to remote objects, and errors. Everything
else is refused on the way in (the call fails, the target method never runs) and on the way out
(the local ``callRemote`` fails at once with `InsecureJelly`, instead of the peer receiving a
silent "unpersistable" placeholder).

`ClusterBroker` also fixes one PB behaviour: an answer that cannot be unserialized used to lose
its waiting Deferred (the caller hung until a timeout); here the Deferred fails with the reason
and the connection, whose peer broke the contract, is closed.
"""

from __future__ import annotations

from typing import Iterable

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.spread.jelly import SecurityOptions, unjellyableRegistry

_log = Logger()

# Atoms of plain values as they arrive (what jelly writes for them). int, float and bytes travel
# as themselves and never reach the type check.
_INCOMING_ATOMS = (
    b"None",
    b"boolean",
    b"unicode",
    b"list",
    b"tuple",
    b"dictionary",
    # Shared or repeated containers (the same tuple twice in one message) travel as references.
    b"reference",
    b"dereference",
    # A Referenceable passed to the peer, and one of the peer's own objects passed back to it.
    b"remote",
    b"local",
)
# Names the outgoing side checks: jelly asks about `reflect.qual(type(value))`.
_OUTGOING_TYPES = tuple(
    f"{t.__module__}.{t.__qualname__}".encode()
    for t in (type(None), bool, int, float, bytes, str, list, tuple, dict)
)
# Errors raised by remote methods travel as CopyableFailure; the receiver rebuilds a CopiedFailure.
_FAILURE_TYPE = f"{pb.CopyableFailure.__module__}.{pb.CopyableFailure.__qualname__}".encode()


class ClusterSecurityOptions(SecurityOptions):
    """Only the names listed here pass: unlike `SecurityOptions`, a dotted name is not
    allowed just for having a dot, and no module or class may be imported by name."""

    def __init__(self, copyable_types: Iterable[str | bytes] = ()) -> None:
        super().__init__()
        self.allowedTypes = dict.fromkeys(_INCOMING_ATOMS + _OUTGOING_TYPES + (_FAILURE_TYPE,), 1)
        self.allowedModules = {}
        self.allowedClasses = {}
        for name in copyable_types:
            self.allow_copyable(name)

    def allow_copyable(self, type_name: str | bytes) -> None:
        """Accept a `pb.RemoteCopy` registered (with `pb.setUnjellyableForClass`) under this name."""
        name = type_name.encode("utf-8") if isinstance(type_name, str) else type_name
        if name not in unjellyableRegistry:
            raise ValueError(f"{name!r} is not registered with pb.setUnjellyableForClass")
        self.allowedTypes[name] = 1

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        if not isinstance(typeName, bytes):
            typeName = typeName.encode("utf-8")
        return typeName in self.allowedTypes

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        return False

    def isClassAllowed(self, klass: type) -> bool:
        return False

    # Widening these options by the generic `SecurityOptions` calls would undo the point.
    def allowBasicTypes(self) -> None:
        raise TypeError("ClusterSecurityOptions is fixed; use allow_copyable for a RemoteCopy")

    def allowTypes(self, *types: object) -> None:
        raise TypeError("ClusterSecurityOptions is fixed; use allow_copyable for a RemoteCopy")

    def allowInstancesOf(self, *classes: type) -> None:
        raise TypeError("ClusterSecurityOptions is fixed; use allow_copyable for a RemoteCopy")

    def allowModules(self, *modules: object) -> None:
        raise TypeError("ClusterSecurityOptions is fixed; use allow_copyable for a RemoteCopy")


def cluster_security(copyable_types: Iterable[str | bytes] = ()) -> ClusterSecurityOptions:
    return ClusterSecurityOptions(copyable_types)


class ClusterBroker(pb.Broker):
    """A Broker whose answers that cannot be unserialized fail their caller instead of hanging,
    and that drops a peer sending what is not banana with one log line, not a traceback."""

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except Exception as e:
            self._dropping(f"{type(e).__name__}: {e}"[:300])

    def _dropping(self, why: str) -> None:
        _log.warn(
            "dropping the control-plane connection from {peer}: it sent what this node cannot read ({why})",
            peer=self._peer(), why=why,
        )
        transport = self.transport
        if transport is not None:
            transport.abortConnection()

    def proto_answer(self, requestID: int, netResult: object) -> None:
        self._settle(requestID, netResult, failed=False)

    def proto_error(self, requestID: int, fail: object) -> None:
        self._settle(requestID, fail, failed=True)

    def _settle(self, requestID: int, payload: object, failed: bool) -> None:
        d = self.waitingForAnswers.pop(requestID, None)
        if d is None:
            _log.warn("peer {peer} answered unknown request {id}; closing", peer=self._peer(), id=requestID)
            self.transport.loseConnection()
            return
        try:
            value = self.unserialize(payload)
        except Exception:
            reason = Failure()
            _log.warn(
                "peer {peer} sent an answer this node refuses ({why}); closing",
                peer=self._peer(),
                why=reason.getErrorMessage(),
            )
            d.errback(reason)
            self.transport.loseConnection()
            return
        if failed:
            d.errback(value)
        else:
            d.callback(value)

    def _peer(self) -> str:
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "?"


class ClusterServerFactory(pb.PBServerFactory):
    """`pb.PBServerFactory` with `ClusterBroker`, the restricted options and no tracebacks sent."""

    protocol = ClusterBroker
    noisy = False  # no "Starting factory" lines

    def __init__(self, root: object, security: ClusterSecurityOptions | None = None) -> None:
        super().__init__(root, unsafeTracebacks=False, security=security or cluster_security())


class ClusterClientFactory(pb.PBClientFactory):
    """`pb.PBClientFactory` with `ClusterBroker`, the restricted options and no tracebacks sent."""

    protocol = ClusterBroker
    noisy = False  # no "Starting factory"/"Stopping factory" lines at every reconnection

    def __init__(self, security: ClusterSecurityOptions | None = None) -> None:
        super().__init__(unsafeTracebacks=False, security=security or cluster_security())


__all__ = [
    "ClusterBroker",
    "ClusterClientFactory",
    "ClusterSecurityOptions",
    "ClusterServerFactory",
    "cluster_security",
]
