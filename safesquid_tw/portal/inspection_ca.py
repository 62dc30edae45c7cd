"""`GET /inspection-ca.crt` (PEM) and `/inspection-ca.der`: the inspection CA's certificate,
without login, on every node's portal port (plain HTTP too), for clients to install. Only the
certificate: the key is never served."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from safesquid_tw.portal.responses import error_response, method_not_allowed, respond

PEM_TYPE = b"application/x-pem-file"
DER_TYPE = b"application/x-x509-ca-cert"


class InspectionCACert(Resource):
    isLeaf = True

    def __init__(self, state: Any, ca_store: Any, *, der: bool) -> None:
        super().__init__()
        self._state = state
        self._ca_store = ca_store
        self._der = der

    def render(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, (b"GET", b"HEAD"), node=self._state.node)
        ca = self._ca_store.current if self._ca_store is not None else None
        if ca is None:
            return error_response(request, status=404, title="No inspection CA",
                                  detail="This node has no TLS inspection CA yet (a slave receives its master's).",
                                  node=self._state.node)
        name = b"inspection-ca.der" if self._der else b"inspection-ca.crt"
        request.setHeader(b"Content-Disposition", b'attachment; filename="%s"' % name)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        body = ca.cert_der if self._der else ca.cert_pem
        return respond(request, body, content_type=DER_TYPE if self._der else PEM_TYPE, cache_control=b"no-cache")


def add_inspection_ca(root: Resource, state: Any, ca_store: Any) -> None:
    root.putChild(b"inspection-ca.crt", InspectionCACert(state, ca_store, der=False))
    root.putChild(b"inspection-ca.der", InspectionCACert(state, ca_store, der=True))


__all__ = ["InspectionCACert", "add_inspection_ca"]
