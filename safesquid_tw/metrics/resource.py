"""`GET /metrics` on the portal port: the node's metrics in the Prometheus text format.

Who may scrape: addresses in the policy's `access_restriction.portal_allow` (no list: anyone,
as for the portal itself), and, when the node was given `--metrics-token-file`, only requests
that carry `Authorization: Bearer <token>`. The same resource answers over HTTPS (the portal) and
in plain HTTP (the health-only site a TLS-only portal port offers to other hosts, like /health):
Prometheus scrapes plain HTTP by default, and counters are no more secret than /health. A token
sent in plain HTTP can be read on the network: use `scheme: https` when a token is set.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from prometheus_client import exposition
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from safesquid_tw.metrics.registry import NodeMetrics
from safesquid_tw.portal.allowlist import PortalAllowList
from safesquid_tw.portal.responses import error_response, method_not_allowed, not_found, respond

ALLOWED = (b"GET", b"HEAD")
# The classic text format (0.0.4): what every Prometheus release reads, Debian's 2.x included;
# our metric names need none of the 1.0.0 format's escaping.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4",
                       "text/plain; version=0.0.4; charset=utf-8").encode("ascii")


def read_token_file(path: str) -> bytes:
    """The first line of the token file; refuses an empty one (a typo must not open /metrics)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ValueError(f"{path}: the metrics token must be at least 16 characters on the first line")
    return token.encode("utf-8")


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: NodeMetrics, allow: PortalAllowList, state: Any, token: bytes | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.allow = allow
        self.state = state
        self.token = token
        self.refused = 0  # scrapes refused (address or token): shown in the metrics themselves

    def render(self, request: IRequest) -> bytes:
        node = self.state.node
        if request.postpath not in ([], [b""]):
            return not_found(request, node=node)
        if request.method not in ALLOWED:
            return method_not_allowed(request, ALLOWED, node=node)
        peer = request.getClientAddress()
        if not self.allow.allows(getattr(peer, "host", None)):
            self.refused += 1
            return error_response(request, status=403, title="Forbidden",
                                  detail="This address may not read the metrics (access_restriction.portal_allow).",
                                  node=node)
        if self.token is not None and not self._token_ok(request):
            self.refused += 1
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="safesquid-tw metrics"')
            return error_response(request, status=401, title="Token required",
                                  detail="The metrics need the bearer token of --metrics-token-file.", node=node)
        body = self.metrics.exposition()
        return respond(request, body, content_type=CONTENT_TYPE)

    def _token_ok(self, request: IRequest) -> bool:
        value = request.getHeader(b"authorization") or b""
        scheme, _, credentials = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self.token or b"")


__all__ = ["MetricsResource", "read_token_file"]
