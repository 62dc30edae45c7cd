"""The ICAP client and scanner against a small scripted ICAP server on loopback.

The real c-icap + ClamAV run in tests/integration/test_antivirus.py; this server exists for the
answers c-icap's virus_scan service never gives (a modified 200, hangs, ISTag changes,
Max-Connections of 1) and to see exactly what the client sent.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from safesquid_tw.icap import codec
from safesquid_tw.icap.holding import HeldBody
from safesquid_tw.icap.scanner import EICAR, Scanner
from safesquid_tw.policy.antivirus import AntivirusRules

REQ = b"GET /f HTTP/1.1\r\nHost: origin.test\r\n\r\n"
RES = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"


class ScriptedIcap(protocol.Protocol):
    def connectionMade(self):
        self.buf = bytearray()
        self.factory.connections += 1
        self.factory.open += 1
        self.factory.max_open = max(self.factory.max_open, self.factory.open)
        self.answered = 0
        self._reset()

    def connectionLost(self, reason=None):
        self.factory.open -= 1

    def _reset(self):
        self.head = None
        self.body = bytearray()
        self.body_at = None
        self.continued = False

    def dataReceived(self, data):
        self.buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        f = self.factory
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head = bytes(self.buf[: end + 4])
            del self.buf[: end + 4]
            if f.drop_reused and self.answered >= 1:
                # As a server whose keep-alive timeout ran out just as the request came.
                self.transport.abortConnection()
                return False
            self.answered += 1
            if self.head.startswith(b"OPTIONS"):
                f.options_asked += 1
                preview = b"Preview: %d\r\n" % f.preview if f.preview is not None else b""
                self.transport.write(
                    b"ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: \"%s\"\r\n%s"
                    b"Allow: 204\r\nMax-Connections: %d\r\nOptions-TTL: 3600\r\nEncapsulated: null-body=0\r\n\r\n"
                    % (f.istag, preview, f.max_connections))
                self._reset()
                return True
            encapsulated = [h for h in self.head.split(b"\r\n") if h.startswith(b"Encapsulated:")][0]
            sections = codec.parse_encapsulated(encapsulated.split(b":", 1)[1].decode())
            self.body_at = sections[-1][1]
            self.has_body = sections[-1][0] != "null-body"
            self.preview = b"Preview:" in self.head
        if len(self.buf) < self.body_at:
            return False
        if self.body_at:
            self.http_heads = bytes(self.buf[: self.body_at])
            del self.buf[: self.body_at]
            self.body_at = 0
        if self.has_body:
            while True:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return False
                line = bytes(self.buf[:end])
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    if len(self.buf) < end + 4:
                        return False
                    del self.buf[: end + 4]
                    if self.preview and b"ieof" not in line and not self.continued and self.body.startswith(b"IGNORED"):
                        break  # a verdict from the preview alone: the rest is never asked for
                    if self.preview and b"ieof" not in line and not self.continued:
                        self.continued = True
                        if f.mode == "hang":
                            return False
                        self.transport.write(b"ICAP/1.0 100 Continue\r\n\r\n")
                        continue
                    break
                if len(self.buf) < end + 2 + size + 2:
                    return False
                self.body += self.buf[end + 2 : end + 2 + size]
                del self.buf[: end + 2 + size + 2]
        f.bodies.append(bytes(self.body))
        self._answer(bytes(self.body))
        self._reset()
        return True

    def _answer(self, body: bytes):
        f = self.factory
        if f.mode == "hang":
            return
        if f.delay:
            d = defer.Deferred()
            reactor.callLater(f.delay, d.callback, None)
            f.pending.append(d)
            d.addCallback(lambda _: self._answer_now(body))
            return
        self._answer_now(body)

    def _answer_now(self, body: bytes):
        f = self.factory
        istag = b'ISTag: "%s"\r\n' % f.istag
        if EICAR in body and f.mode != "blind":
            res = b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/html\r\n\r\n"
            self.transport.write(b"ICAP/1.0 200 OK\r\n" + istag + b"X-Infection-Found: Type=0; Resolution=2; Threat=Test.Virus;\r\n"
                                 b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(res) + res
                                 + codec.encode_chunk(b"<p>virus</p>") + codec.LAST_CHUNK)
        elif body.startswith(b"IGNORED"):
            self.transport.write(b"ICAP/1.0 204 No Content\r\n" + istag + b"\r\n")
        elif b"modify-me" in body:
            res = b"HTTP/1.1 200 OK\r\nX-Modified: yes\r\n\r\n"
            self.transport.write(b"ICAP/1.0 200 OK\r\n" + istag + b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(res)
                                 + res + codec.encode_chunk(b"replaced") + codec.LAST_CHUNK)
        else:
            self.transport.write(b"ICAP/1.0 204 No Content\r\n" + istag + b"\r\n")


class ScriptedFactory(protocol.Factory):
    protocol = ScriptedIcap

    def __init__(self, mode="normal", preview=4, max_connections=10):
        self.mode = mode
        self.preview = preview
        self.max_connections = max_connections
        self.istag = b"TAG-A"
        self.bodies: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.options_asked = 0
        self.delay = 0.0
        self.pending = []
        self.drop_reused = False


@pytest.fixture
def icap_server():
    servers = []

    def start(**kw):
        factory = ScriptedFactory(**kw)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        servers.append(port)
        return factory, f"icap://127.0.0.1:{port.getHost().port}/avscan"

    yield start
    for port in servers:
        port.stopListening()


def rules(*urls, **settings) -> AntivirusRules:
    return AntivirusRules.from_section({"enabled": True, "icap_services": list(urls), **settings})


def held(data: bytes) -> HeldBody:
    body = HeldBody(memory_limit=16)  # small: the file path is exercised too
    for i in range(0, len(data), 7):
        body.append(data[i : i + 7])
    return body


async def ready(scanner: Scanner, r: AntivirusRules) -> None:
    scanner.configure(r)
    for service in scanner.services.values():
        if service.testing is not None:
            await service.testing


@pytest_twisted.ensureDeferred
async def test_clean_infected_and_preview(icap_server):
    server, url = icap_server(preview=4)
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    assert scanner.services[url].state == "ok"  # the self-test found EICAR
    data = b"clean content longer than the preview"
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))
    assert verdict.outcome == "clean"
    assert server.bodies[-1] == data  # preview, 100 Continue, then the rest, all intact
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"ab" + EICAR + b"cd"))
    assert verdict.outcome == "infected" and verdict.threat == "Test.Virus"
    exact = await scanner.scan(r, b"REQMOD", REQ, None, held(b"four"))
    assert exact.outcome == "clean" and server.bodies[-1] == b"four"
    assert scanner.stats()["detections"] == 1 and scanner.stats()["scans"] == 3
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_a_modified_message_replaces_the_original(icap_server):
    server, url = icap_server()
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"please modify-me now"))
    assert verdict.outcome == "replaced"
    assert verdict.http_head.get(b"x-modified") == b"yes" and verdict.body == b"replaced"
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_clean_verdict_cache_follows_the_istag(icap_server):
    server, url = icap_server()
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    data = b"a popular file" * 100
    assert (await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))).outcome == "clean"
    scanned = len(server.bodies)
    again = await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))
    assert again.cached and len(server.bodies) == scanned
    server.istag = b"TAG-B"  # new signatures: the next transaction (here the self-test) learns it
    await scanner.self_test(scanner.services[url])
    after = await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))
    assert not after.cached and server.bodies[-1] == data
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_max_connections_is_honoured_without_losing_scans(icap_server):
    server, url = icap_server(max_connections=1)
    server.delay = 0.05
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    results = await defer.gatherResults([
        defer.Deferred.fromCoroutine(_scan(scanner, r, b"body %d" % i)) for i in range(5)
    ])
    assert [v.outcome for v in results] == ["clean"] * 5
    assert server.max_open == 1  # one connection, reused for every transaction
    scanner.stop()


async def _scan(scanner, r, data):
    return await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))


@pytest_twisted.ensureDeferred
async def test_a_hung_service_times_out_and_the_next_one_answers(icap_server):
    hung, hung_url = icap_server(mode="hang")
    good, good_url = icap_server()
    scanner = Scanner(reactor)
    r = rules(hung_url, good_url, timeout_seconds=1)
    await ready(scanner, r)
    assert scanner.services[hung_url].state == "down"
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(EICAR))
    assert verdict.outcome == "infected" and verdict.service == good_url
    only_hung = rules(hung_url, timeout_seconds=1)
    verdict = await scanner.scan(only_hung, b"RESPMOD", REQ, RES, held(b"x"))
    assert verdict.outcome == "unscanned" and "down" in verdict.reason
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_a_service_that_lets_eicar_through_is_broken(icap_server):
    blind, url = icap_server(mode="blind")
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    service = scanner.services[url]
    assert service.state == "broken" and "EICAR" in service.last_error
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"anything"))
    assert verdict.outcome == "unscanned"
    assert scanner.stats()["services"][0]["state"] == "broken"
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_service_is_down():
    scanner = Scanner(reactor)
    port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    url = f"icap://127.0.0.1:{number}/avscan"
    r = rules(url)
    await ready(scanner, r)
    assert scanner.services[url].state == "down"
    assert scanner.stats()["services"][0]["reachable"] is False
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_the_server_closed_is_retried_once(icap_server):
    server, url = icap_server()
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    server.drop_reused = True  # every reused connection is closed when the next request arrives
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"data"))
    assert verdict.outcome == "clean"
    assert scanner.services[url].state == "ok" and scanner.services[url].failures == 0
    scanner.stop()


def test_options_go_stale_after_their_ttl():
    from twisted.internet.task import Clock

    from safesquid_tw.icap.client import ServicePool
    clock = Clock()
    pool = ServicePool(clock, codec.parse_service_url("icap://127.0.0.1:1/x"))
    assert pool.options_stale()
    pool.options = codec.ServiceOptions(frozenset({"RESPMOD"}), "t", 1024, True, 5, 60, frozenset(), frozenset(),
                                        frozenset())
    pool.options_at = clock.seconds()
    assert not pool.options_stale() and pool.max_connections == 5
    clock.advance(60)
    assert pool.options_stale()


@pytest_twisted.ensureDeferred
async def test_without_a_preview_a_large_body_streams_whole(icap_server):
    server, url = icap_server(preview=None)
    scanner = Scanner(reactor)
    r = rules(url)
    await ready(scanner, r)
    assert scanner.services[url].state == "ok"
    data = bytes(range(256)) * 1000 + EICAR  # 256 KB from a temporary file, the virus at the end
    verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(data))
    assert verdict.outcome == "infected" and server.bodies[-1] == data
    big_clean = bytes(range(256)) * 1000
    assert (await scanner.scan(r, b"REQMOD", REQ, None, held(big_clean))).outcome == "clean"
    assert server.bodies[-1] == big_clean
    scanner.stop()


@pytest_twisted.ensureDeferred
async def test_a_verdict_after_the_preview_keeps_the_connection(icap_server):
    server, url = icap_server(preview=8)
    scanner = Scanner(reactor)
    r = rules(url, verdict_cache_seconds=0)
    await ready(scanner, r)
    connections = server.connections
    for _ in range(3):
        verdict = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"IGNORED and a long rest never sent"))
        assert verdict.outcome == "clean"
        assert server.bodies[-1] == b"IGNORED "  # only the preview went out
    follow = await scanner.scan(r, b"RESPMOD", REQ, RES, held(b"x" * 20 + EICAR))
    assert follow.outcome == "infected"
    assert server.connections == connections  # one kept-alive connection carried them all
    scanner.stop()


def test_held_body_spills_to_a_file_and_reads_back():
    body = HeldBody(memory_limit=10)
    body.append(b"0123456789")
    assert not body.spilled
    body.append(b"abcdef")
    assert body.spilled and body.size == 16
    assert body.read(8, 4) == b"89ab" and b"".join(body.pieces(5)) == b"0123456789abcdef"
    body.close()
