"""Verdicts from the ICAP services of the policy's `antivirus` section.

`Scanner.scan` tries the services in turn (the next when one fails) and turns the answer into a
`Verdict`: clean (204, or a clean verdict cached for the same body and ISTag), infected (a 200
naming a threat or replacing the message with a 403), replaced (any other 200), or unscanned
(no service answered: the caller applies `fail_mode`).

Each service is tested with the EICAR test string at start, whenever it answers again after a
failure, and every `self_test_seconds`: a service that lets EICAR through is marked broken and
treated as down (c-icap started before clamd answers 204 to everything while OPTIONS looks fine).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from safesquid_tw.icap import codec
from safesquid_tw.icap.client import PIECE, IcapUnavailable, ServicePool, Transaction
from safesquid_tw.icap.holding import HeldBody

log = Logger()

# The EICAR anti-virus test file (eicar.org): harmless, recognised by every scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
RETRY_SECONDS = 5.0  # a down or broken service is tested again this soon
CACHE_ENTRIES = 10000
_SELF_TEST_REQUEST = b"GET /eicar.com HTTP/1.1\r\nHost: self-test.invalid\r\n\r\n"
_SELF_TEST_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(EICAR))


@attrs.frozen
class Verdict:
    outcome: str  # "clean", "infected", "replaced", "unscanned"
    threat: str | None = None
    service: str | None = None
    reason: str | None = None
    http_head: codec.HttpHead | None = None  # "replaced": the scanner's message head
    body: bytes | None = None  # "replaced": its body (None: no body)
    cached: bool = False


class _Failed(Exception):
    pass


def _printable(text: str, limit: int = 200) -> str:
    """A scanner's threat name as the block page and the record show it: one short line."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit].strip() or "unnamed threat"


class ServiceState:
    """One ICAP service as this node sees it: its pool, health and counters."""

    def __init__(self, reactor, url: str) -> None:
        self.url = url
        self.pool = ServicePool(reactor, codec.parse_service_url(url))
        self.state = "starting"  # starting, ok, down, broken
        self.observed_at: float | None = None  # when the state was last found (merging workers' views)
        self.scans = 0
        self.detections = 0
        self.failures = 0
        self.latency_ms: float | None = None  # the last transaction's
        self.last_error: str | None = None
        self.self_test_at: float | None = None
        self.testing: defer.Deferred | None = None
        self.retry = None

    @property
    def usable(self) -> bool:
        return self.state in ("starting", "ok")

    @property
    def istag(self) -> str | None:
        return self.pool.options.istag if self.pool.options is not None else None

    def as_dict(self) -> dict:
        return {
            "url": self.url, "state": self.state, "reachable": self.state in ("ok", "broken"),
            "istag": self.istag, "scans": self.scans, "detections": self.detections, "failures": self.failures,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "last_error": self.last_error, "self_test_at": self.self_test_at, "observed_at": self.observed_at,
        }


class Scanner:
    def __init__(self, reactor, *, cache_entries: int = CACHE_ENTRIES, now=time.time) -> None:
        self.reactor = reactor
        self.now = now
        self.services: dict[str, ServiceState] = {}
        self.rules = None
        self._loop: task.LoopingCall | None = None
        self._loop_seconds = 0
        self._cache: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self.cache_entries = cache_entries
        self.cache_hits = 0
        self.blocked = 0
        self.unscanned = 0

    # -- configuration --------------------------------------------------------------------------
    def configure(self, rules) -> None:
        """Follow a policy version's `antivirus` section (called whenever a version applies)."""
        if rules is self.rules:
            return
        self.rules = rules
        wanted = rules.services if rules.enabled else ()
        for url in list(self.services):
            if url not in wanted:
                gone = self.services.pop(url)
                if gone.retry is not None and gone.retry.active():
                    gone.retry.cancel()
                gone.pool.close()
        for url in wanted:
            if url not in self.services:
                service = self.services[url] = ServiceState(self.reactor, url)
                self.self_test(service)
        if self._loop is not None and (not wanted or self._loop_seconds != rules.self_test_seconds):
            self._loop.stop()
            self._loop = None
        if wanted and self._loop is None:
            self._loop_seconds = rules.self_test_seconds
            self._loop = task.LoopingCall(self._self_test_all)
            self._loop.clock = self.reactor
            self._loop.start(rules.self_test_seconds, now=False)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        for service in self.services.values():
            if service.retry is not None and service.retry.active():
                service.retry.cancel()
            service.pool.close()

    def _self_test_all(self) -> None:
        for service in list(self.services.values()):
            if service.testing is None:
                self.self_test(service)

    # -- self-test ------------------------------------------------------------------------------
    def self_test(self, service: ServiceState) -> defer.Deferred:
        """Send EICAR through the service; it is ok only if it finds it."""
        if service.testing is not None:
            return service.testing
        d = defer.ensureDeferred(self._self_test(service))
        service.testing = d

        def done(result):
            service.testing = None
            return result

        d.addBoth(done)
        return d

    async def _self_test(self, service: ServiceState) -> str:
        timeout = self.rules.timeout if self.rules is not None else 30.0
        body = HeldBody()
        body.append(EICAR)
        before = service.state
        try:
            response = await self._modify(service, timeout, b"RESPMOD", _SELF_TEST_REQUEST, _SELF_TEST_RESPONSE,
                                          body, "", force=True)
            verdict = self._interpret(service, b"RESPMOD", response)
        except (IcapUnavailable, _Failed) as e:
            service.last_error = f"self-test: {e}"
            self._set_state(service, "down", before)
            return service.state
        finally:
            body.close()
            service.self_test_at = self.now()
        if verdict is not None and verdict.outcome == "infected":
            self._set_state(service, "ok", before)
        else:
            service.last_error = "self-test: the EICAR test file was let through"
            self._set_state(service, "broken", before)
        return service.state

    def _set_state(self, service: ServiceState, state: str, before: str) -> None:
        service.state = state
        service.observed_at = self.now()
        if state != before:
            if state == "ok":
                log.info("ICAP service {url} is scanning (ISTag {istag})", url=service.url, istag=service.istag)
            else:
                log.warn("ICAP service {url} is {state}: {error}", url=service.url, state=state,
                         error=service.last_error)
        if state in ("down", "broken") and service.url in self.services:
            if service.retry is None or not service.retry.active():
                service.retry = self.reactor.callLater(RETRY_SECONDS, self._retry, service)

    def _retry(self, service: ServiceState) -> None:
        service.retry = None
        if service.url in self.services and service.state in ("down", "broken"):
            self.self_test(service)

    def _service_failed(self, service: ServiceState, error: str) -> None:
        service.failures += 1
        service.last_error = error
        before = service.state
        log.warn("ICAP service {url} failed: {error}", url=service.url, error=error)
        self._set_state(service, "down", before)

    # -- scanning -------------------------------------------------------------------------------
    def scan(self, rules, method: bytes, http_request_head: bytes, http_response_head: bytes | None,
             body: HeldBody, extension: str = "") -> defer.Deferred:
        """A Deferred Verdict for the held body (never fails: errors become "unscanned")."""
        if self.rules is None:
            self.configure(rules)
        else:
            # A request still under an older policy version may name a service the current one
            # dropped: it is added (and self-tested), never used to reconfigure the scanner.
            for url in rules.services:
                if url not in self.services:
                    self.self_test(self.services.setdefault(url, ServiceState(self.reactor, url)))
        return defer.ensureDeferred(self._scan(rules, method, http_request_head, http_response_head, body, extension))

    async def _scan(self, rules, method, http_request_head, http_response_head, body, extension) -> Verdict:
        digest = body.sha256() if rules.cache_seconds else None
        errors = []
        for url in rules.services:
            service = self.services.get(url)
            if service is None:
                continue
            if service.state == "starting" and service.testing is not None:
                await service.testing  # the first self-test decides whether this service is trusted
            if not service.usable:
                errors.append(f"{url} is {service.state}")
                continue
            if digest is not None and self._cached(service, digest):
                self.cache_hits += 1
                return Verdict("clean", service=url, cached=True)
            started = self.reactor.seconds()
            try:
                response = await self._modify(service, rules.timeout, method, http_request_head,
                                              http_response_head, body, extension)
                verdict = self._interpret(service, method, response)
            except (IcapUnavailable, _Failed) as e:
                self._service_failed(service, str(e))
                errors.append(f"{url}: {e}")
                continue
            except Exception as e:  # a bug must not leave the transfer hanging
                log.failure("ICAP scan", None)
                self._service_failed(service, f"internal error: {e}")
                errors.append(f"{url}: internal error")
                continue
            service.latency_ms = (self.reactor.seconds() - started) * 1000.0
            service.scans += 1
            if verdict.outcome == "infected":
                service.detections += 1
            elif verdict.outcome == "clean" and digest is not None and service.istag:
                self._remember(service, digest, rules.cache_seconds)
            return verdict
        self.unscanned += 1
        return Verdict("unscanned", reason="; ".join(errors) or "no scanner is configured")

    async def _modify(self, service: ServiceState, timeout: float, method: bytes, http_request_head: bytes,
                      http_response_head: bytes | None, body: HeldBody | None, extension: str,
                      *, force: bool = False) -> codec.IcapResponse | None:
        pool = service.pool
        if pool.options_stale():
            await pool.refresh_options(timeout)
        options = pool.options
        if method.decode("ascii") not in options.methods:
            raise _Failed(f"the service does not offer {method.decode('ascii')}")
        mode = "preview" if force else options.transfer_mode(extension.lower())
        if mode == "ignore":
            return None
        preview = options.preview if mode == "preview" else None
        txn_body = body if body is not None and body.size else None
        if txn_body is None:
            first = codec.modification_request(method, pool.url, http_request_head=http_request_head,
                                               http_response_head=http_response_head,
                                               body_first=b"" if body is not None else None,
                                               preview=preview, ieof=True)
            txn = Transaction(first)
        elif preview is not None:
            size = txn_body.size
            head = txn_body.read(0, min(preview, size))
            ieof = size <= preview
            first = codec.modification_request(method, pool.url, http_request_head=http_request_head,
                                               http_response_head=http_response_head, body_first=head,
                                               preview=preview, ieof=ieof)
            txn = Transaction(first, txn_body, len(head), expects_continue=not ieof)
        elif txn_body.size <= PIECE:
            first = codec.modification_request(method, pool.url, http_request_head=http_request_head,
                                               http_response_head=http_response_head,
                                               body_first=txn_body.read(0, txn_body.size), preview=None, ieof=False)
            txn = Transaction(first)
        else:
            first = codec.modification_request(method, pool.url, http_request_head=http_request_head,
                                               http_response_head=http_response_head, body_first=b"",
                                               preview=None, ieof=False, body_complete=False)
            txn = Transaction(first, txn_body, 0, send_rest_now=True)
        response = await pool.transact(txn, timeout)
        istag = response.get("ISTag")
        if istag and options.istag and istag.strip().strip('"') != options.istag:
            # The service changed (new signatures): ask OPTIONS again; cached verdicts lapse.
            pool.options = attrs.evolve(options, istag=istag.strip().strip('"'))
        return response

    def _interpret(self, service: ServiceState, method: bytes, response: codec.IcapResponse | None) -> Verdict:
        url = service.url
        if response is None:
            return Verdict("clean", service=url, reason="Transfer-Ignore")
        if response.status == 204:
            return Verdict("clean", service=url)
        if response.status != 200:
            raise _Failed(f"answered {response.status} {response.reason}")
        threat = response.threat()
        if threat:
            return Verdict("infected", threat=_printable(threat), service=url)
        replacement = response.http_response
        if replacement is not None and replacement.status == 403:
            return Verdict("infected", threat="blocked by the scanner", service=url)
        if method == b"REQMOD" and replacement is not None:
            # The scanner answers the client itself instead of letting the upload go on.
            return Verdict("infected", threat=f"refused by the scanner ({replacement.status})", service=url)
        head = replacement if method == b"RESPMOD" else response.http_request
        if head is None:
            raise _Failed("a 200 without the modified message")
        return Verdict("replaced", service=url, http_head=head, body=response.body)

    # -- the clean-verdict cache ------------------------------------------------------------------
    def _cached(self, service: ServiceState, digest: str) -> bool:
        key = (service.url, service.istag or "", digest)
        expiry = self._cache.get(key)
        if expiry is None:
            return False
        if expiry < self.reactor.seconds():
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _remember(self, service: ServiceState, digest: str, seconds: int) -> None:
        key = (service.url, service.istag or "", digest)
        self._cache[key] = self.reactor.seconds() + seconds
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    # -- figures ----------------------------------------------------------------------------------
    def health(self) -> dict | None:
        """`stats()` while scanning is enabled, else None (for /health and the cluster view)."""
        return self.stats() if self.rules is not None and self.rules.enabled else None

    def stats(self) -> dict:
        """Scanner state for /health, the cluster view and metrics (plain JSON values)."""
        services = [s.as_dict() for s in self.services.values()]
        rules = self.rules
        return {
            "enabled": bool(rules is not None and rules.enabled),
            "fail_mode": rules.fail_mode if rules is not None else None,
            "services": services,
            "scans": sum(s["scans"] for s in services),
            "detections": sum(s["detections"] for s in services),
            "failures": sum(s["failures"] for s in services),
            "unscanned": self.unscanned,
            "cache_entries": len(self._cache),
            "cache_hits": self.cache_hits,
        }


__all__ = ["EICAR", "ServiceState", "Scanner", "Verdict"]
