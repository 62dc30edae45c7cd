"""The Configuration Portal as one twisted.web Site: pages, the `/api/v1/` API, static files,
and the unauthenticated load-balancer checks (`GET /health`, `OPTIONS /`, `OPTIONS *`).

`build_portal_site(ctx)` is what a node serves on its `--portal` endpoint, whatever its role:
a master and a standalone node edit policy, see their cluster and reports; a slave shows its
policy read-only, names its master, and edits its own startup parameters.
"""

from __future__ import annotations

from typing import Any

import argon2
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from safesquid_tw.portal import (
    pages_auth,
    pages_cluster,
    pages_directory,
    pages_history,
    pages_policy,
    pages_reports,
    tls_admin,
)
from safesquid_tw.portal.api import ApiApp
from safesquid_tw.portal.context import PortalContext
from safesquid_tw.resources import static_dir
from safesquid_tw.portal.health import HealthResource
from safesquid_tw.portal.inspection_ca import add_inspection_ca
from safesquid_tw.portal.responses import CSS_CONTENT_TYPE, method_not_allowed, readiness_options, respond
from safesquid_tw.portal.services import PortalServices
from safesquid_tw.portal.site import PAGE_METHODS, PortalRequest, PortalSite, StarOptions, Stylesheet, _Directory
from safesquid_tw.portal.web import PortalApp, Route

STATIC_TYPES = {".css": CSS_CONTENT_TYPE, ".js": b"text/javascript; charset=utf-8"}


def all_routes() -> list[Route]:
    # Fixed paths before the patterns that would also match them (/policy/history vs /policy/{section}).
    return [*pages_auth.ROUTES, *pages_history.ROUTES, *pages_policy.ROUTES, *pages_cluster.ROUTES,
            *pages_reports.ROUTES, *pages_directory.ROUTES, *tls_admin.PAGE_ROUTES]


class StaticAsset(Resource):
    """One file of the static folder, read once."""

    isLeaf = True

    def __init__(self, state: Any, data: bytes, content_type: bytes) -> None:
        super().__init__()
        self._state = state
        self._data = data
        self._content_type = content_type

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, (b"GET", b"HEAD"), node=self._state.node)
        return respond(request, self._data, content_type=self._content_type, cache_control=b"public, max-age=300")


class HomeResource(Resource):
    """`/`: OPTIONS answers readiness for load balancers (no login); the rest is the portal's home."""

    isLeaf = True

    def __init__(self, state: Any, app: PortalApp) -> None:
        super().__init__()
        self._state = state
        self._app = app

    def render(self, request: IRequest) -> bytes | int:
        if request.method == b"OPTIONS":
            return readiness_options(request, PAGE_METHODS, ready=self._state.ready)
        return self._app.render(request)


class PortalAppRoot(_Directory):
    def __init__(self, services: PortalServices) -> None:
        state = services.ctx.state
        super().__init__(state)
        self.state = state
        self.star = StarOptions(state)
        self.app = PortalApp(services, all_routes())
        static = _Directory(state)
        static.putChild(b"style.css", Stylesheet(state))
        folder = static_dir()
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.suffix in STATIC_TYPES:
                static.putChild(path.name.encode(), StaticAsset(state, path.read_bytes(), STATIC_TYPES[path.suffix]))
        self.putChild(b"", HomeResource(state, self.app))
        self.putChild(b"health", HealthResource(state))
        self.putChild(b"static", static)
        self.putChild(b"api", ApiApp(services))
        add_inspection_ca(self, state, services.ctx.ca_store)

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return self.app


def build_portal_site(ctx: PortalContext, *, admin_hasher: argon2.PasswordHasher | None = None) -> Site:
    """The portal Site for this node. On first start it creates the `admin` account (its password
    in `<state-dir>/admin-password`). `admin_hasher` replaces the argon2id cost (tests only)."""
    services = PortalServices.create(ctx, admin_hasher=admin_hasher)
    site = PortalSite(PortalAppRoot(services), requestFactory=PortalRequest, reactor=ctx.reactor)
    site.portal_services = services
    return site


__all__ = ["PortalContext", "build_portal_site", "static_dir"]
