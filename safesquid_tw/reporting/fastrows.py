"""A batch of shipped records decoded, checked and turned into rows in one pass, in C where it can.

Every record the proxy writes has the same keys with the same types (`accesslog.record.JSON_KEYS`),
so the bounds of `recordcheck.check_record` and the types `rows.record_row` insists on can be said
once, per key, as a typed schema: msgspec decodes a JSON line straight into it and checks every
bound on the way (about 1 µs a record, against 9 µs for `json.loads` + `check_record` +
`record_row`). The schema is stricter than those checks (no unknown key, `ts` present, integers
written as integers, no NaN): a record it refuses is not refused here but handed to the generic
path, which stores it or quarantines it with the reason it always gave. So a record is accepted
exactly when the generic path accepts it, and its row is the same.

`decode(records)` returns, per record, either the row of `record_row` (when the schema took it)
or None (the caller runs the generic path on that record alone).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from safesquid_tw.reporting.recordcheck import (
    MAX_BYTES, MAX_DLP_ITEMS, MAX_DURATION_MS, MAX_GROUPS_ITEMS, MAX_POLICY_VERSION, MAX_STATUS, MAX_TIME,
    MIN_TIME, TEXT_LIMITS,
)
from safesquid_tw.reporting.rows import _groups_json, host_of


def _text(key: str) -> Any:
    return Annotated[str, msgspec.Meta(max_length=TEXT_LIMITS[key])] | None


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The access record as the proxy writes it, with check_record's bounds on every key."""

    ts: Annotated[float, msgspec.Meta(ge=MIN_TIME, le=MAX_TIME)]
    time: _text("time") = None
    node: _text("node") = None
    client: _text("client") = None
    user: _text("user") = None
    method: _text("method") = None
    url: _text("url") = None
    status: Annotated[int, msgspec.Meta(ge=0, le=MAX_STATUS)] | None = None
    bytes_in: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] | None = None
    bytes_out: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] | None = None
    duration_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_DURATION_MS)] | None = None
    action: _text("action") = None
    rule: _text("rule") = None
    category: _text("category") = None
    application: _text("application") = None
    policy_version: Annotated[int, msgspec.Meta(ge=0, le=MAX_POLICY_VERSION)] | Annotated[
        str, msgspec.Meta(max_length=64)] | None = None
    dlp: Annotated[list[Any], msgspec.Meta(max_length=MAX_DLP_ITEMS)] | None = None
    detail: Annotated[str, msgspec.Meta(max_length=TEXT_LIMITS["detail"])] | None = None
    groups: Annotated[list[str], msgspec.Meta(max_length=MAX_GROUPS_ITEMS)] | None = None
    transfer: _text("transfer") = None
    tls: _text("tls") = None


_decode = msgspec.json.Decoder(_Record).decode
_REFUSED = (msgspec.ValidationError, msgspec.DecodeError)
_DETAIL_LIMIT = TEXT_LIMITS["detail"]
# Group lists already checked (their total length), by their JSON text: a user's groups repeat.
_GROUPS_CHECKED: set[str] = set()


def decode(records: list[bytes]) -> list[tuple[Any, ...] | None]:
    """Per record: `record_row`'s row when the record fits the schema, else None."""
    rows: list[tuple[Any, ...] | None] = []
    append = rows.append
    hosts: dict[str, str | None] = {}  # a batch names the same hosts again and again
    for raw in records:
        try:
            r = _decode(raw)
        except _REFUSED:
            append(None)
            continue
        dlp = r.dlp
        if dlp:
            dlp = json.dumps(dlp)
            if len(dlp) > _DETAIL_LIMIT:
                append(None)  # refused by check_record: the generic path says why
                continue
        else:
            dlp = None
        groups = r.groups
        if groups:
            groups = _groups_json(groups)
            if groups not in _GROUPS_CHECKED:
                if sum(map(len, r.groups)) > _DETAIL_LIMIT:
                    append(None)
                    continue
                if len(_GROUPS_CHECKED) >= 4096:
                    _GROUPS_CHECKED.clear()
                _GROUPS_CHECKED.add(groups)
        else:
            groups = None
        url = r.url
        if url is None:
            host = None
        else:
            # Two URLs alike up to the first "/" of their authority have the same host.
            slash = url.find("/", url.find("://") + 3) if "://" in url else -1
            prefix = url if slash < 0 else url[:slash]
            host = hosts.get(prefix, "")
            if host == "":
                host = hosts[prefix] = host_of(url)
        when = r.ts
        bytes_in = r.bytes_in
        bytes_out = r.bytes_out
        append((
            when, int(when // 60), r.client, r.user, r.method, url, host, host[::-1] if host else None,
            r.status, 0 if bytes_in is None else bytes_in, 0 if bytes_out is None else bytes_out,
            r.duration_ms, r.action, r.rule, r.category, r.application, r.policy_version, dlp, r.detail,
            r.transfer or "complete", r.tls, groups,
        ))
    return rows


__all__ = ["decode"]
