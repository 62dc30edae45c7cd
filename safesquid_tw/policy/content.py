"""Content security: file types refused by MIME type or extension, and body size limits.

The proxy asks `blocked_request` before forwarding and `blocked_response` when the response head
arrives; the size limits are enforced by the proxy while bodies stream.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

# filename="a b.exe", filename=a.exe, filename*=UTF-8''a%20b.exe (RFC 6266)
_DISPOSITION_NAME = re.compile(r"""filename(\*?)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""", re.IGNORECASE)


def extension_of(name: str) -> str | None:
    """The lower-case extension of the last path segment, as a downloading system would see it."""
    segment = name.rpartition("/")[2].rpartition("\\")[2]
    segment = segment.split(";", 1)[0].rstrip(". ")  # Windows ignores trailing dots and blanks
    stem, dot, extension = segment.rpartition(".")
    if not dot or not extension:
        return None
    return extension.lower()


def url_path_extension(path: str) -> str | None:
    """Extension of a request target's path (query and fragment ignored, %-escapes decoded)."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = unquote(path, errors="replace")
        # "a.exe%3F.txt" or "a.exe%00.txt": an origin that decodes before it splits serves a.exe.
        for stop in "?#\x00":
            path = path.split(stop, 1)[0]
    return extension_of(path)


def disposition_filenames(value: str) -> list[str]:
    names = []
    for match in _DISPOSITION_NAME.finditer(value):
        extended, quoted, bare = match.groups()
        name = quoted.replace("\\", "") if quoted is not None else bare
        if extended:
            # charset'language'percent-encoded-name
            name = unquote(name.split("'", 2)[-1], errors="replace")
        names.append(name)
    return names


class ContentRules:
    """The `content_security` section of one policy version."""

    __slots__ = ("max_upload", "max_download", "_mime_exact", "_mime_major", "_extensions")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.max_upload: int | None = spec["max_upload_bytes"]
        self.max_download: int | None = spec["max_download_bytes"]
        mime_types = [m.lower() for m in spec["blocked_mime_types"]]
        self._mime_exact = frozenset(m for m in mime_types if not m.endswith("/*"))
        self._mime_major = frozenset(m[:-2] for m in mime_types if m.endswith("/*"))
        self._extensions = frozenset(e.lower() for e in spec["blocked_extensions"])

    def _extension_reason(self, extension: str | None) -> str | None:
        if extension is not None and extension in self._extensions:
            return f"files of type .{extension} are blocked"
        return None

    def blocked_request(self, path: str) -> str | None:
        """Why a request for this path (and query) is refused, or None."""
        if not self._extensions:
            return None
        return self._extension_reason(url_path_extension(path))

    def blocked_response(self, content_type: bytes | None, content_disposition: bytes | None, path: str) -> str | None:
        """Why a response is refused, from its Content-Type, Content-Disposition and URL path."""
        if content_type and (self._mime_exact or self._mime_major):
            mime = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
            if mime in self._mime_exact or mime.partition("/")[0] in self._mime_major:
                return f"content of type {mime} is blocked"
        if not self._extensions:
            return None
        if content_disposition:
            for name in disposition_filenames(content_disposition.decode("latin-1")):
                reason = self._extension_reason(extension_of(name))
                if reason:
                    return reason
        return self.blocked_request(path)


__all__ = ["ContentRules", "disposition_filenames", "extension_of", "url_path_extension"]
