"""How large a request body the portal takes, decided from the head alone.

A body is refused (413, connection closed, the rest never read) when its declared or counted
size passes the limit for what the request can be: a login form is a few hundred bytes; a
request without a live session or API token can do nothing with a body at all; an
administrator's forms are small, and only uploads (a backup to restore, JSON for the API) are
large. twisted.web would otherwise keep any body whole and parse its form on the reactor thread.
"""

from __future__ import annotations

LOGIN_BODY = 8 * 1024
ANONYMOUS_BODY = 16 * 1024
FORM_BODY = 1024 * 1024
UPLOAD_BODY = 64 * 1024 * 1024
# Form fields an administrator's page may send (the largest policy form has a few dozen).
MAX_FORM_FIELDS = 2000

UPLOAD_TYPES = (b"multipart/form-data", b"application/json", b"application/gzip", b"application/octet-stream")


def media_type(content_type: bytes | None) -> bytes:
    return (content_type or b"").split(b";", 1)[0].strip().lower()


def body_limit(path: bytes, content_type: bytes | None, *, authenticated: bool) -> int:
    """The largest body, in bytes, for a request to `path` (without the query)."""
    if path == b"/login" or path.startswith(b"/login/"):
        return LOGIN_BODY
    if not authenticated:
        return ANONYMOUS_BODY
    if media_type(content_type) in UPLOAD_TYPES:
        return UPLOAD_BODY
    return FORM_BODY


def too_many_fields(args: dict[bytes, list[bytes]]) -> bool:
    return sum(len(values) for values in args.values()) > MAX_FORM_FIELDS


__all__ = ["ANONYMOUS_BODY", "FORM_BODY", "LOGIN_BODY", "MAX_FORM_FIELDS", "UPLOAD_BODY", "body_limit",
           "media_type", "too_many_fields"]
