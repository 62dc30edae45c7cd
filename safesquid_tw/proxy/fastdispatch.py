"""Read and write events handed to the connections without Twisted's per-event log context.

The epoll reactor wraps every event it dispatches in ``log.callWithLogger``: it asks the
connection for its log prefix, copies the log context dict, pushes and pops it, and catches
exceptions that ``_doReadOrWrite`` already catches itself. That costs about 2.6 µs per event, two
events per proxied request (the client's request, the origin's response): a few percent of a
small request's CPU. The context only names the connection in lines logged through the legacy
``twisted.python.log`` API while it handles the event; this project logs with
``twisted.logger.Logger``, whose events do not read it.

`install` replaces the reactor's ``doIteration`` with a copy of ``EPollReactor.doPoll`` that
calls ``_doReadOrWrite`` directly; an exception escaping it (which Twisted's own code does not
let happen) is still logged with the connection's prefix. Other reactors are left alone.

A plain read event (``EPOLLIN`` alone) on a TCP connection whose class reads the way
``tcp.Connection`` does is handled in the loop itself: one ``recv`` and the protocol's
``dataReceived``, which is what ``_doReadOrWrite`` -> ``doRead`` -> ``_dataReceived`` do, without
those three calls (two events per proxied request). An error from ``recv``, the end of the
stream, or an exception from the protocol disconnects the connection exactly as Twisted would
(``CONNECTION_LOST``, ``CONNECTION_DONE``, the exception, logged). Every other event, and every
class that reads its own way (TLS wrappers are protocols and keep this path; a transport that
overrides ``doRead`` does not), goes through ``_doReadOrWrite`` as before. A transport that reads
as ``tcp.Connection`` but ends its input its own way (``leanaccept.LeanServer``) says so with
``reads_in_dispatch`` and gives ``input_ended``, which the loop calls at the end of the stream.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN

from twisted.internet import main, tcp
from twisted.logger import Logger
from twisted.python import log as legacy_log

log = Logger()

_direct_read: dict[type, bool] = {}  # selectable class -> reads as tcp.Connection does


def reads_directly(cls: type) -> bool:
    """Whether events of `cls` may be read in the loop (its reading is tcp.Connection's own)."""
    ok = _direct_read.get(cls)
    if ok is None:
        ok = _direct_read[cls] = (
            issubclass(cls, tcp.Connection)
            and (cls.doRead is tcp.Connection.doRead or getattr(cls, "reads_in_dispatch", False))
            and cls._dataReceived is tcp.Connection._dataReceived
        )
    return ok


def install(reactor) -> bool:
    """Use the lean dispatch on `reactor` if it is an epoll reactor; True when installed."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not on Linux
        return False
    if not isinstance(reactor, EPollReactor) or getattr(reactor, "_lean_dispatch", False):
        return False
    reactor._lean_dispatch = True
    reactor.doIteration = _lean_do_poll(reactor)
    return True


def _lean_do_poll(reactor):
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    direct = _direct_read
    lost, done = main.CONNECTION_LOST, main.CONNECTION_DONE

    def do_poll(timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN and (direct.get(type(selectable)) or reads_directly(type(selectable))) \
                        and selectable.fileno() != -1:
                    try:
                        data = selectable.socket.recv(selectable.bufferSize)
                    except OSError as se:
                        if se.args[0] == errno.EWOULDBLOCK:
                            continue
                        why = lost
                    else:
                        if data:
                            try:
                                selectable.protocol.dataReceived(data)
                                continue
                            except BaseException:
                                # As _doReadOrWrite: logged, and the connection is disconnected.
                                why = sys.exc_info()[1]
                                legacy_log.err()
                        else:
                            ended = getattr(selectable, "input_ended", None)  # leanaccept.LeanServer
                            why = done if ended is None else ended()
                            if why is None:
                                continue
                    disconnect(selectable, why, True)
                    continue
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("dispatching an event to {selectable}", selectable=_prefix(selectable))

    return do_poll


def _prefix(selectable) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return repr(selectable)
