"""One access record per client request, and its JSON-lines form.

The same JSON object is written to the local access log and shipped to the master, so its keys
are fixed and always present (absent values are `null` or `[]`): a reader never has to guess.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import attrs

from safesquid_tw.accesslog.jsonline import json_line

# The order of keys in every JSON line; readers and tests rely on it staying put.
JSON_KEYS: tuple[str, ...] = (
    "time",
    "ts",
    "node",
    "client",
    "user",
    "method",
    "url",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "action",
    "rule",
    "category",
    "application",
    "policy_version",
    "dlp",
    "detail",
    "groups",
    "transfer",
    "tls",
)


def strip_url_credentials(url: str) -> str:
    """`scheme://user:pass@host/...` -> `scheme://host/...`; anything else is returned unchanged.

    The proxy removes credentials before building a record; this is the second line of defence so
    a password can never reach a log file or the master. A URL without "@" costs one scan.
    """
    if "@" not in url:  # no userinfo possible: the usual URL costs one scan in C
        return url
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    authority_start = scheme_end + 3
    authority_end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, authority_start, authority_end)
        if found >= 0:
            authority_end = found
    at = url.rfind("@", authority_start, authority_end)
    if at < 0:
        return url
    return url[:authority_start] + url[at + 1 : authority_end] + url[authority_end:]


@attrs.frozen(slots=True)
class AccessRecord:
    time: float  # epoch seconds at which the request started
    node: str
    client: str
    user: str | None
    method: str
    url: str = attrs.field(converter=strip_url_credentials)
    status: int
    bytes_in: int  # request bytes received from the client, head and body
    bytes_out: int  # response bytes sent to the client, head and body
    duration_ms: float  # written to the log to the microsecond
    action: str  # "allow", "deny", "auth", "error", "tunnel", ...
    rule: str | None
    category: str | None
    application: str | None
    policy_version: int | None
    dlp: tuple[str, ...] = ()  # names of the DLP detectors that hit
    detail: str | None = None  # e.g. "upstream connect refused", "download size limit"
    groups: tuple[str, ...] = ()  # the authenticated user's policy groups
    # "complete", "origin_incomplete" (the origin cut the response short), "client_aborted"
    transfer: str = "complete"
    tls: str | None = None  # "inspected" (decrypted), "bypassed" (spliced tunnel), None: plain HTTP

    def to_json_line(self) -> bytes:
        """One JSON object and a newline, keys in `JSON_KEYS` order, ASCII only."""
        time_text = iso_utc_millis(self.time)
        line = json_line(self, time_text)  # the usual record, a third of the encoder's time
        if line is not None:
            return line
        obj = {
            "time": time_text,
            "ts": self.time,
            "node": self.node,
            "client": self.client,
            "user": self.user,
            "method": self.method,
            "url": self.url,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            # Microseconds are the most a duration can honestly claim; shorter lines too.
            "duration_ms": round(self.duration_ms, 3),
            "action": self.action,
            "rule": self.rule,
            "category": self.category,
            "application": self.application,
            "policy_version": self.policy_version,
            "dlp": list(self.dlp),
            "detail": self.detail,
            "groups": list(self.groups),
            "transfer": self.transfer,
            "tls": self.tls,
        }
        # ensure_ascii: a stray surrogate from a badly encoded URL cannot break the whole batch.
        return _ENCODER.encode(obj).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AccessRecord:
        """Rebuild a record from a parsed JSON line; ValueError names the first bad field.

        Keys this version does not know are ignored, so a newer node's records still load.
        """
        if not isinstance(obj, dict):
            raise ValueError(f"access record must be a JSON object, not {type(obj).__name__}")
        return cls(
            time=_number(obj, "ts"),
            node=_text(obj, "node"),
            client=_text(obj, "client"),
            user=_optional_text(obj, "user"),
            method=_text(obj, "method"),
            url=_text(obj, "url"),
            status=_integer(obj, "status"),
            bytes_in=_integer(obj, "bytes_in"),
            bytes_out=_integer(obj, "bytes_out"),
            duration_ms=_number(obj, "duration_ms"),
            action=_text(obj, "action"),
            rule=_optional_text(obj, "rule"),
            category=_optional_text(obj, "category"),
            application=_optional_text(obj, "application"),
            policy_version=_optional_integer(obj, "policy_version"),
            dlp=_text_list(obj, "dlp"),
            detail=_optional_text(obj, "detail"),
            groups=_text_list(obj, "groups"),
            # Records written before the key existed were complete as far as anyone knew.
            transfer=_text(obj, "transfer") if obj.get("transfer") is not None else "complete",
            tls=_optional_text(obj, "tls"),
        )


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)

# Formatting a timestamp is on every record; records come in bursts within the same second.
_last_second: tuple[int, str] = (-1, "")


def iso_utc_millis(epoch: float) -> str:
    """`2026-11-22T03:07:19.123Z`."""
    global _last_second
    second = math.floor(epoch)
    millis = min(int((epoch - second) * 1000), 999)
    cached_second, prefix = _last_second
    if cached_second != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, prefix)
    return f"{prefix}.{millis:03d}Z"


def _field(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise ValueError(f"access record: {key!r} is missing")
    return obj[key]


def _text(obj: dict[str, Any], key: str) -> str:
    value = _field(obj, key)
    if not isinstance(value, str):
        raise ValueError(f"access record: {key!r} must be a string, not {value!r}")
    return value


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"access record: {key!r} must be a string or null, not {value!r}")
    return value


def _integer(obj: dict[str, Any], key: str) -> int:
    value = _field(obj, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"access record: {key!r} must be an integer, not {value!r}")
    return value


def _optional_integer(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    return _integer(obj, key)


def _number(obj: dict[str, Any], key: str) -> float:
    value = _field(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"access record: {key!r} must be a finite number, not {value!r}")
    return float(value)


def _text_list(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"access record: {key!r} must be a list of strings, not {value!r}")
    return tuple(value)


__all__ = ["JSON_KEYS", "AccessRecord", "iso_utc_millis", "strip_url_credentials"]
