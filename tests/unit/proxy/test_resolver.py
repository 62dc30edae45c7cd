"""The proxy's resolver: cache, shared lookups, deadlines, no lookup holding up another."""

import socket

import pytest
from twisted.internet import defer, task

from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.resolver import Resolver


class FakeLookups:
    def __init__(self):
        self.pending: dict[str, list[defer.Deferred]] = {}
        self.calls: list[str] = []

    def __call__(self, host):
        self.calls.append(host)
        d = defer.Deferred()
        self.pending.setdefault(host, []).append(d)
        return d

    def answer(self, host, result):
        for d in self.pending.pop(host):
            d.callback(result)

    def fail(self, host, exc):
        for d in self.pending.pop(host):
            d.errback(exc)


def make(**kw):
    clock = task.Clock()
    lookups = FakeLookups()
    return clock, lookups, Resolver(clock, run_lookup=lookups, timeout=5, ttl=60, negative_ttl=5, **kw)


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_ip_literals_need_no_lookup():
    clock, lookups, r = make()
    assert results(r.resolve("127.0.0.1")) == [[(socket.AF_INET, "127.0.0.1")]]
    assert results(r.resolve("::1")) == [[(socket.AF_INET6, "::1")]]
    assert lookups.calls == []


def test_invalid_tld_fails_at_once_with_nxdomain():
    clock, lookups, r = make()
    [failure] = results(r.resolve("does-not-exist.invalid"))
    assert isinstance(failure.value, ProxyFailure)
    assert failure.value.status == 502 and failure.value.error_type == "dns_error"
    assert "NXDOMAIN" in failure.value.extra
    assert lookups.calls == []


def test_concurrent_lookups_of_one_name_share_a_query_and_answers_are_cached():
    clock, lookups, r = make()
    a, b = results(r.resolve("example.com")), results(r.resolve("example.com"))
    assert lookups.calls == ["example.com"]
    lookups.answer("example.com", [(socket.AF_INET, "192.0.2.1")])
    assert a == b == [[(socket.AF_INET, "192.0.2.1")]]
    assert results(r.resolve("example.com")) == [[(socket.AF_INET, "192.0.2.1")]]
    assert lookups.calls == ["example.com"]
    clock.advance(61)
    r.resolve("example.com")
    assert lookups.calls == ["example.com", "example.com"]


def test_a_slow_name_times_out_without_holding_up_another():
    clock, lookups, r = make()
    slow = results(r.resolve("slow.example"))
    clock.advance(1)
    fast = results(r.resolve("fast.example"))
    lookups.answer("fast.example", [(socket.AF_INET, "192.0.2.2")])
    assert fast == [[(socket.AF_INET, "192.0.2.2")]]
    assert slow == []
    clock.advance(4.5)
    [failure] = slow
    assert failure.value.status == 504 and failure.value.error_type == "dns_timeout"
    # The late answer is still cached for the next request.
    lookups.answer("slow.example", [(socket.AF_INET, "192.0.2.3")])
    assert results(r.resolve("slow.example")) == [[(socket.AF_INET, "192.0.2.3")]]


@pytest.mark.parametrize(
    "exc, status, kind",
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), 502, "dns_error"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), 502, "dns_error"),
        (OSError("boom"), 502, "dns_error"),
    ],
)
def test_failures_map_to_502_and_are_cached_briefly(exc, status, kind):
    clock, lookups, r = make()
    first = results(r.resolve("bad.example"))
    lookups.fail("bad.example", exc)
    assert first[0].value.status == status and first[0].value.error_type == kind
    again = results(r.resolve("bad.example"))
    assert again[0].value.status == status
    assert lookups.calls == ["bad.example"]
    clock.advance(6)
    r.resolve("bad.example")
    assert lookups.calls == ["bad.example", "bad.example"]


def test_known_answers_what_resolve_would_fire_with_at_once_and_nothing_else():
    clock, lookups, r = make()
    assert r.known("127.0.0.1") == [(socket.AF_INET, "127.0.0.1")]
    assert r.known("::1") == [(socket.AF_INET6, "::1")]
    assert r.known("example.com") is None  # not looked up yet; known() never starts a lookup
    assert lookups.calls == []
    r.resolve("example.com")
    assert r.known("example.com") is None  # in flight
    lookups.answer("example.com", [(socket.AF_INET, "192.0.2.1")])
    assert r.known("example.com") == [(socket.AF_INET, "192.0.2.1")]
    clock.advance(61)
    assert r.known("example.com") is None  # expired: resolve() looks it up again
    r.resolve("bad.example")
    lookups.fail("bad.example", OSError("no such name"))
    assert r.known("bad.example") is None  # a cached failure is resolve()'s to report
    assert r.known("x.invalid") is None
