"""One access record, as a slave's spool wrote it, checked and turned into a row of the report store.

`record_row` accepts a parsed JSON record and returns the values the ``requests`` table stores
after (node, segment, seq); a record that cannot be stored raises `MalformedRecord`, whose message
becomes its quarantine reason. `host_of` extracts the host that the domain filter and the domain
roll-up key on.

Pure module: no I/O, tested by tables.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

# Fields of a record that, when present, must be strings (stored as they are).
_TEXT_KEYS = ("client", "user", "method", "url", "action", "rule", "category", "application")


# JSON text of the group lists seen lately: a user's groups repeat on every record of theirs.
_GROUPS_JSON: dict[tuple[Any, ...], str] = {}
_GROUPS_JSON_MAX = 4096


def _groups_json(groups: Any) -> str | None:
    """The JSON text of a record's policy groups (None when there are none)."""
    if groups is None or groups == []:
        return None
    try:
        text = _GROUPS_JSON.get(tuple(groups))  # only checked lists are remembered
    except TypeError:  # not a list of hashable values: refused below
        text = None
    if text is not None and isinstance(groups, list):
        return text
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise MalformedRecord(f"'groups' must be a list of strings, not {groups!r}")
    if len(_GROUPS_JSON) >= _GROUPS_JSON_MAX:
        _GROUPS_JSON.clear()
    text = _GROUPS_JSON[tuple(groups)] = json.dumps(groups)
    return text


class MalformedRecord(ValueError):
    """A record that cannot be stored as a request; the message is the quarantine reason."""


def host_of(url: str | None) -> str | None:
    """The host of an absolute URL or a CONNECT authority, lower-cased, without port or dot."""
    if not url:
        return None
    start = url.find("://")
    if start >= 0:
        start += 3
    elif url.startswith("/"):
        return None  # origin-form: no host in the URL
    else:
        start = 0
    end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, start, end)
        if found >= 0:
            end = found
    authority = url[start:end]
    authority = authority[authority.rfind("@") + 1 :]
    if authority.startswith("["):
        host = authority[1 : authority.find("]")] if "]" in authority else authority[1:]
    else:
        host = authority.partition(":")[0]
    return host.lower().rstrip(".") or None


def _epoch(obj: dict[str, Any]) -> float:
    value = obj.get("ts")
    if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
        if math.isfinite(value):
            return float(value)
        raise MalformedRecord(f"'ts' is not finite: {value!r}")
    text = obj.get("time")
    if not isinstance(text, str):
        raise MalformedRecord("no 'ts' (epoch seconds) nor 'time' (ISO 8601)")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedRecord(f"'time' is not ISO 8601: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _integer(obj: dict[str, Any], key: str, default: int | None) -> int | None:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MalformedRecord(f"{key!r} must be an integer, not {value!r}")
    return value


def record_row(obj: Any) -> tuple[Any, ...]:
    """(time, minute, client, user, method, url, host, host_rev, status, bytes_in, bytes_out,
    duration_ms, action, rule, category, application, policy_version, dlp, detail, transfer, tls, groups) of a
    parsed JSON record (`dlp` and `groups` as JSON text, None when empty); MalformedRecord names the first
    field that cannot be stored."""
    if not isinstance(obj, dict):
        raise MalformedRecord(f"not a JSON object but {type(obj).__name__}")
    when = _epoch(obj)
    get = obj.get
    texts = []
    for key in _TEXT_KEYS:
        value = get(key)
        if value is not None and not isinstance(value, str):
            raise MalformedRecord(f"{key!r} must be a string, not {value!r}")
        texts.append(value)
    client, user, method, url, action, rule, category, application = texts
    duration = get("duration_ms")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))):
        raise MalformedRecord(f"'duration_ms' must be a number, not {duration!r}")
    bytes_in = _integer(obj, "bytes_in", 0)
    bytes_out = _integer(obj, "bytes_out", 0)
    if bytes_in < 0 or bytes_out < 0:  # type: ignore[operator]
        raise MalformedRecord("byte counts must not be negative")
    version = get("policy_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
        raise MalformedRecord(f"'policy_version' must be an integer or a string, not {version!r}")
    dlp = get("dlp")
    if dlp is not None and not isinstance(dlp, list):
        raise MalformedRecord(f"'dlp' must be a list, not {dlp!r}")
    detail = get("detail")
    if detail is not None and not isinstance(detail, str):
        detail = json.dumps(detail, sort_keys=True)
    transfer = get("transfer") or "complete"
    if not isinstance(transfer, str):
        raise MalformedRecord(f"'transfer' must be a string, not {transfer!r}")
    host = host_of(url)
    tls = get("tls")
    if tls is not None and not isinstance(tls, str):
        raise MalformedRecord(f"'tls' must be a string, not {tls!r}")
    groups = _groups_json(get("groups"))
    return (
        when, int(when // 60), client, user, method, url, host, host[::-1] if host else None,
        _integer(obj, "status", None), bytes_in, bytes_out, duration, action, rule, category,
        application, version, json.dumps(dlp) if dlp else None, detail, transfer, tls,
        groups,
    )  # fmt: skip


__all__ = [
    "MalformedRecord",
    "host_of",
    "record_row",
]
