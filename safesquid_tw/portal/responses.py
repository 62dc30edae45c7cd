"""Response helpers shared by the portal's resources: security headers, bodies, error pages.

Every portal resource answers every method itself (with this module's 405 page) rather than
raising UnsupportedMethod, whose twisted.web page carries neither our look nor our headers.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web.iweb import IRequest

from safesquid_tw.pages import render_error_page

SERVER_NAME = b"safesquid-tw"

# No inline script or style anywhere in the portal: everything comes from the portal itself.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"Content-Security-Policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
)

HSTS = b"max-age=31536000"

HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
CSS_CONTENT_TYPE = b"text/css; charset=utf-8"


def apply_standard_headers(request: IRequest) -> None:
    """Security headers, and our Server header in place of twisted.web's version string."""
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)
    if request.isSecure():
        # Browsers that once reached the portal over TLS never fall back to plain HTTP for it.
        request.setHeader(b"Strict-Transport-Security", HSTS)
    request.setHeader(b"Server", SERVER_NAME)


def respond(
    request: IRequest,
    body: bytes,
    *,
    code: int = 200,
    content_type: bytes = HTML,
    cache_control: bytes = b"no-store",
) -> bytes:
    """Set status and entity headers; the body to return from render (empty for HEAD)."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", cache_control)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    # Returning the body for HEAD works too, but twisted.web then logs a warning per request.
    return b"" if request.method == b"HEAD" else body


def error_response(request: IRequest, *, status: int, title: str, detail: str, node: str) -> bytes:
    """One of our error pages as the response (the portal's variant, linking its stylesheet)."""
    path = request.uri.decode("latin-1") if request.uri else None
    body = render_error_page(status=status, title=title, detail=detail, url=path, node=node, linked_css=True)
    return respond(request, body, code=status)


def not_found(request: IRequest, *, node: str) -> bytes:
    return error_response(
        request, status=404, title="Not found", detail="There is no page at this address.", node=node
    )


def method_not_allowed(request: IRequest, allowed: Sequence[bytes], *, node: str) -> bytes:
    request.setHeader(b"Allow", b", ".join(allowed))
    method = request.method.decode("latin-1")
    return error_response(
        request,
        status=405,
        title="Method not allowed",
        detail=f"This address does not accept {method} requests.",
        node=node,
    )


def readiness_options(request: IRequest, allowed: Sequence[bytes], *, ready: bool) -> bytes:
    """OPTIONS: 200 when the node is ready, 503 when not, so load-balancer checks see readiness.

    HAProxy's default check is `OPTIONS / HTTP/1.0`.
    """
    request.setHeader(b"Allow", b", ".join(allowed))
    request.setResponseCode(200 if ready else 503)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"0")
    return b""


__all__ = [
    "CSS_CONTENT_TYPE",
    "HTML",
    "JSON",
    "SECURITY_HEADERS",
    "SERVER_NAME",
    "apply_standard_headers",
    "error_response",
    "method_not_allowed",
    "not_found",
    "readiness_options",
    "respond",
]
