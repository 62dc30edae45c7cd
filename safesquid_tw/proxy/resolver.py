"""Name resolution that never stalls the reactor.

Lookups run `getaddrinfo` (so /etc/hosts, nsswitch and the system resolver behave as administrators
expect) in a thread pool of the proxy's own, not the reactor's shared one: a slow name holds one
thread, never the others. Answers are cached for a short while, concurrent lookups of one name share a
single query, and every lookup has a deadline after which the waiting requests get a 504.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Callable

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from safesquid_tw.proxy.responses import ProxyFailure

log = Logger()

Address = tuple[int, str]  # (socket family, ip text)


@attrs.define(slots=True)
class _Entry:
    expires: float
    addresses: list[Address] | None
    failure: ProxyFailure | None


def _blocking_lookup(host: str) -> list[Address]:
    seen: list[Address] = []
    for family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        entry = (family, sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and entry not in seen:
            seen.append(entry)
    return seen


class Resolver:
    def __init__(
        self,
        reactor: IReactorTime,
        *,
        threads_max: int = 32,
        timeout: float = 5.0,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        lookup: Callable[[str], list[Address]] = _blocking_lookup,
        run_lookup: Callable[[str], defer.Deferred] | None = None,
        max_entries: int = 50000,
    ) -> None:
        """`run_lookup(host)` starts one lookup and returns its Deferred; by default `lookup`
        runs in this resolver's own thread pool (tests hand in a controllable one)."""
        self._reactor = reactor
        self._timeout = timeout
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._lookup = lookup
        self._max_entries = max_entries
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._pool = ThreadPool(minthreads=0, maxthreads=threads_max, name="safesquid-dns")
        self._run_lookup = run_lookup or self._in_pool

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def known(self, host: str) -> list | None:
        """The addresses of `host` when they are known now (an address literal, or a live cached
        answer): what `resolve` would fire with at once, without a Deferred. None otherwise."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        entry = self._cache.get(host)
        if entry is not None and entry.failure is None and entry.expires > self._reactor.seconds():
            return entry.addresses
        return None

    def resolve(self, host: str) -> defer.Deferred:
        """Fire with a list of (family, ip) or fail with a ProxyFailure (502 or 504)."""
        literal = _literal(host)
        if literal is not None:
            return defer.succeed([literal])
        if host == "invalid" or host.endswith(".invalid"):
            # RFC 6761 section 6.4: name resolution APIs answer negatively for .invalid at once.
            return defer.fail(_nxdomain(host))
        now = self._reactor.seconds()
        entry = self._cache.get(host)
        if entry is not None and entry.expires > now:
            if entry.failure is not None:
                return defer.fail(entry.failure)
            return defer.succeed(entry.addresses)
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._inflight.get(host)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._inflight[host] = [waiter]
            self._start_lookup(host)
        timer = self._reactor.callLater(self._timeout, self._expire_waiter, host, waiter)
        waiter.addBoth(_cancel_timer, timer)
        return waiter

    def _in_pool(self, host: str) -> defer.Deferred:
        return threads.deferToThreadPool(self._reactor, self._pool, self._lookup, host)

    def _start_lookup(self, host: str) -> None:
        d = self._run_lookup(host)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(host,), errbackArgs=(host,))

    def _expire_waiter(self, host: str, waiter: defer.Deferred) -> None:
        waiters = self._inflight.get(host, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiter.called:
            waiter.errback(
                ProxyFailure(504, "dns_timeout", f"looking up {host} took longer than {self._timeout:g} s")
            )

    def _answered(self, addresses: list[Address], host: str) -> None:
        if not addresses:
            self._settle(host, None, _nxdomain(host))
        else:
            self._settle(host, addresses, None)

    def _failed(self, reason, host: str) -> None:
        err = reason.value
        if isinstance(err, socket.gaierror) and err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            failure = _nxdomain(host)
        elif isinstance(err, socket.gaierror) and err.errno == socket.EAI_AGAIN:
            failure = ProxyFailure(502, "dns_error", f"the name server could not answer for {host}", 'rcode="SERVFAIL"')
        else:
            failure = ProxyFailure(502, "dns_error", f"looking up {host} failed: {err}")
        self._settle(host, None, failure)

    def _settle(self, host: str, addresses: list[Address] | None, failure: ProxyFailure | None) -> None:
        ttl = self._ttl if failure is None else self._negative_ttl
        if len(self._cache) >= self._max_entries:
            self._prune()
        self._cache[host] = _Entry(self._reactor.seconds() + ttl, addresses, failure)
        for waiter in self._inflight.pop(host, []):
            if waiter.called:
                continue
            if failure is not None:
                waiter.errback(failure)
            else:
                waiter.callback(addresses)

    def _prune(self) -> None:
        now = self._reactor.seconds()
        for name in [n for n, e in self._cache.items() if e.expires <= now]:
            del self._cache[name]
        if len(self._cache) >= self._max_entries:
            self._cache.clear()


def _cancel_timer(result: object, timer) -> object:
    if timer.active():
        timer.cancel()
    return result


def _nxdomain(host: str) -> ProxyFailure:
    return ProxyFailure(502, "dns_error", f"the name {host} does not exist", 'rcode="NXDOMAIN"')


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than a tunnel's own bookkeeping
def _literal(host: str) -> Address | None:
    if not host or not (host[0].isdigit() or ":" in host):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))


__all__ = ["Resolver", "Address"]
