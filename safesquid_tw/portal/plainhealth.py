"""What a TLS-only portal port still answers in plain HTTP from other hosts: the health check.

Load balancers check `/health` (HAProxy's default check is `OPTIONS / HTTP/1.0`) in plain HTTP;
nothing secret is there. Every other plain-HTTP request gets a pointer to https://.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from safesquid_tw.nodestate import NodeState
from safesquid_tw.portal.health import HealthResource
from safesquid_tw.portal.inspection_ca import add_inspection_ca
from safesquid_tw.portal.responses import error_response, readiness_options
from safesquid_tw.portal.site import PortalRequest, PortalSite, StarOptions, _Directory

_ALLOWED = (b"GET", b"HEAD", b"OPTIONS")


class _UseHttps(Resource):
    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self.state = state

    def render(self, request: IRequest) -> bytes:
        if request.method == b"OPTIONS" and request.path == b"/":
            return readiness_options(request, _ALLOWED, ready=self.state.ready)
        return error_response(
            request, status=400, title="Use HTTPS",
            detail="This port serves the portal over HTTPS only (plain HTTP: /health alone).",
            node=self.state.node,
        )


class HealthOnlyRoot(_Directory):
    def __init__(self, state: NodeState, ca_store=None) -> None:
        super().__init__(state)
        self.state = state
        self.star = StarOptions(state)
        self._use_https = _UseHttps(state)
        self.putChild(b"health", HealthResource(state))
        add_inspection_ca(self, state, ca_store)

    def getChild(self, path: bytes, request: IRequest):
        return self._use_https

    def render(self, request: IRequest) -> bytes:
        return self._use_https.render(request)


def make_health_only_site(state: NodeState, *, reactor=None, ca_store=None) -> PortalSite:
    kwargs = {} if reactor is None else {"reactor": reactor}
    return PortalSite(HealthOnlyRoot(state, ca_store), requestFactory=PortalRequest, **kwargs)
