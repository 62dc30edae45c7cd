"""The cluster view as JSON: `GET /api/v1/cluster`, what the master knows of every slave."""

from __future__ import annotations

import json
from typing import Callable

from twisted.web.resource import Resource

from safesquid_tw.master.registry import SlaveRegistry
from safesquid_tw.policy.store import PolicyStore


class ClusterViewResource(Resource):
    isLeaf = True

    def __init__(self, registry: SlaveRegistry, store: PolicyStore, authorize: Callable[[object], bool]) -> None:
        super().__init__()
        self.registry = registry
        self.store = store
        self.authorize = authorize

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if not self.authorize(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="safesquid-tw"')
            return b'{"error": "an API token is needed (Authorization: Bearer ...)"}\n'
        current = self.store.current
        body = {
            "policy_version": current.version if current else None,
            "policy_digest": current.digest if current else None,
            "nodes": self.registry.snapshot(current.version if current else None),
        }
        return json.dumps(body, indent=1).encode() + b"\n"
