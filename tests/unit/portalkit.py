"""A whole portal in memory for resource-level tests: real stores in a temporary state directory,
a fake clock, blocking work run at once (and counted), and treq's StubTreq clients (no sockets)
talking to the very Site a node serves."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import Any

import argon2
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from treq.testing import StubTreq

from safesquid_tw.policy.history import PolicyHistory
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.portal.app import PortalContext, build_portal_site
from safesquid_tw.portal.site import PortalRequest

POLICY = {
    "format": "safesquid-policy/1",
    "access": {"default_action": "allow", "rules": [
        {"name": "block-games", "action": "deny", "domains": ["*.games.test"], "reason": "No games"},
    ]},
    "groups": [{"name": "staff"}],
    "categories": {"adult": {"domains": ["adult.test"]}},
}
CHEAP_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.ID)
CSRF_FIELD = re.compile(rb'name="csrf" value="([^"]+)"')
LOGIN_TOKEN = re.compile(rb'name="login_token" value="([^"]+)"')


class ThreadRecorder:
    """Runs blocking work at once, remembering what ran (what a node runs in its thread pool)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, fn, *args, **kwargs) -> defer.Deferred:
        self.calls.append(getattr(fn, "__qualname__", repr(fn)))
        return defer.maybeDeferred(fn, *args, **kwargs)


class Response:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers_all(name)
        return values[-1] if values else None

    def headers_all(self, name: str) -> list[str]:
        return [v.decode("latin-1") if isinstance(v, bytes) else v for v in self.headers.getRawHeaders(name) or []]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def csrf(self) -> str:
        found = CSRF_FIELD.search(self.body)
        assert found, "no CSRF token on this page"
        return found.group(1).decode()

    def visible_text(self) -> str:
        return unescape(re.sub(r"<[^>]+>", " ", self.text))


def address_request_factory(address: str):
    class FromAddress(PortalRequest):
        def getClientAddress(self):
            return IPv4Address("TCP", address, 31337)

    return FromAddress


class Client:
    """One browser (its own cookie jar) or API program talking to the portal."""

    def __init__(self, portal: "Portal", scheme: str = "http") -> None:
        self.portal = portal
        self.scheme = scheme
        self.stub = StubTreq(Resource())
        self.stub._agent._serverFactory = portal.site
        self.csrf: str | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        url = f"{self.scheme}://portal.test{path}"
        kwargs.setdefault("allow_redirects", False)
        d = self.stub.request(method, url, **kwargs)
        self.stub.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, f"{method} {path}: no response"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        response = results[0]
        body_d = self.stub.content(response)
        self.stub.flush()
        bodies: list[Any] = []
        body_d.addBoth(bodies.append)
        if hasattr(bodies[0], "raiseException"):
            bodies[0].raiseException()
        return Response(response.code, response.headers, bodies[0])

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: bool = True, **kwargs: Any) -> Response:
        fields = dict(data or {})
        if csrf and "csrf" not in fields and self.csrf:
            fields["csrf"] = self.csrf
        return self.request("POST", path, data=fields, **kwargs)

    def login(self, name: str = "admin", password: str | None = None, *, expect: int = 303) -> Response:
        page = self.get("/login")
        token = LOGIN_TOKEN.search(page.body).group(1).decode()
        password = self.portal.admin_password if password is None else password
        response = self.request("POST", "/login", data={"name": name, "password": password, "login_token": token})
        assert response.code == expect, (response.code, response.text[:500])
        if response.code == 303:
            self.csrf = self.get("/").csrf()
        return response


class Portal:
    """The portal of one node, built as a node builds it, on a fake clock."""

    def __init__(self, tmp_path: Path, *, role: str = "standalone", policy: dict | None = None, registry: Any = None,
                 reports: Any = None, master_address: str | None = None, startup_params: Any = None,
                 wall_start: float = 1_800_000_000.0) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.clock = Clock()
        self.wall = [wall_start]
        wall_clock = lambda: self.wall[0]  # noqa: E731
        self.store = PolicyStore(self.state_dir, clock=wall_clock)
        self.state = NodeState(role=role, node="gw1", started=wall_start, now=wall_clock)
        self.store.add_observer(self._on_policy)
        self.history = None if role == "slave" else PolicyHistory(self.store, self.state_dir, clock=wall_clock)
        document = POLICY if policy is None else policy
        if self.history is not None:
            self.history.apply(document, by="policy file", comment="loaded from test", source="file test.json")
        else:
            self.store.apply_document(document, source="master")
        self.threads = ThreadRecorder()
        self.ctx = PortalContext(
            role=role, state=self.state, state_dir=self.state_dir, reactor=self.clock, store=self.store,
            history=self.history, registry=registry, reports=reports, master_address=master_address,
            startup_params=startup_params, in_thread=self.threads, wall_clock=wall_clock,
        )
        self.site = build_portal_site(self.ctx, admin_hasher=CHEAP_HASHER)
        self.services = self.site.portal_services
        self.admin_password = (self.state_dir / "admin-password").read_text().strip()

    def _on_policy(self, policy) -> None:
        self.state.policy_version = policy.version
        self.state.policy_digest = policy.digest

    def client(self, scheme: str = "http") -> Client:
        return Client(self, scheme)

    def from_address(self, address: str) -> None:
        self.site.requestFactory = address_request_factory(address)

    def admin(self) -> Client:
        client = self.client()
        client.login()
        return client

    def api_token(self, name: str = "automation") -> str:
        _info, secret = self.services.tokens.create(name, by="admin")
        return secret

    def audit(self) -> list[dict]:
        path = self.state_dir / "logs" / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall[0] += seconds
