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
"""

from __future__ import annotations

import errno

from twisted.logger import Logger

log = Logger()


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
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("dispatching an event to {selectable}", selectable=_prefix(selectable))

    return do_poll


def _prefix(selectable) -> str:
    try:
        return selectable.logPrefix()
    except Exception:
        return repr(selectable)
