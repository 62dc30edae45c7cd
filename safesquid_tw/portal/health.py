"""GET /health: the node's state as JSON; 200 when it can take traffic, 503 when it cannot.

Load balancers (HAProxy `option httpchk GET /health`) and monitoring read the status code;
people and scripts read the body.
"""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from safesquid_tw.nodestate import NodeState
from safesquid_tw.portal.responses import JSON, method_not_allowed, not_found, readiness_options, respond

ALLOWED = (b"GET", b"HEAD", b"OPTIONS")


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, state: NodeState) -> None:
        super().__init__()
        self._state = state

    def render(self, request: IRequest) -> bytes:
        state = self._state
        if request.postpath not in ([], [b""]):  # /health/anything is not the health endpoint
            return not_found(request, node=state.node)
        method = request.method
        if method == b"OPTIONS":
            return readiness_options(request, ALLOWED, ready=state.ready)
        if method not in ALLOWED:
            return method_not_allowed(request, ALLOWED, node=state.node)
        body = json.dumps(state.as_health_json(), sort_keys=True).encode("utf-8") + b"\n"
        return respond(request, body, code=200 if state.ready else 503, content_type=JSON)


__all__ = ["HealthResource"]
