"""An access record's JSON line written without the general JSON encoder.

Every finished request writes one line (accesslog/record.py, `AccessRecord.to_json_line`), so its
cost is on the proxy's per-request path. `json.JSONEncoder.encode` builds a C encoder for each call
and walks a dict of 21 keys built for it, about 6 µs a line; the keys and their order never change,
so the line is one format string with each value encoded by the same C function the encoder uses
for strings (`encode_basestring_ascii`) and `repr` for numbers: the same bytes in about a third of
the time.

`json_line` covers the record as the proxy builds it: strings or None, exact ints, finite floats,
lists or tuples of strings. Anything else (a bool or an IntEnum where an int belongs, a
non-finite float, an object) makes it return None, and the caller uses the general encoder, which
produces (or refuses) exactly what it always did. tests/unit/accesslog/test_jsonline.py compares
the two byte for byte.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring_ascii as _string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safesquid_tw.accesslog.record import AccessRecord

_FORMAT = (
    '{"time":%s,"ts":%s,"node":%s,"client":%s,"user":%s,"method":%s,"url":%s,"status":%s,'
    '"bytes_in":%s,"bytes_out":%s,"duration_ms":%s,"action":%s,"rule":%s,"category":%s,'
    '"application":%s,"policy_version":%s,"dlp":%s,"detail":%s,"groups":%s,"transfer":%s,"tls":%s}\n'
)
_isfinite = math.isfinite
_float = float.__repr__
_int = int.__repr__


def _strings(values) -> str:
    if type(values) is not tuple and type(values) is not list:
        raise TypeError("not a list of strings")
    return "[" + ",".join(map(_string, values)) + "]" if values else "[]"


def json_line(record: "AccessRecord", time_text: str) -> bytes | None:
    """`record`'s line as `to_json_line` writes it (`time_text`: its ISO time), or None when a
    value is not of the usual type (the general encoder then writes it)."""
    ts = record.time
    duration = record.duration_ms
    status, bytes_in, bytes_out, version = record.status, record.bytes_in, record.bytes_out, record.policy_version
    if (
        type(ts) is not float or type(duration) is not float
        or not _isfinite(ts) or not _isfinite(duration)
        or type(status) is not int or type(bytes_in) is not int or type(bytes_out) is not int
        or (version is not None and type(version) is not int)
    ):
        return None
    user, rule, category, application = record.user, record.rule, record.category, record.application
    detail, transfer, tls, dlp, groups = record.detail, record.transfer, record.tls, record.dlp, record.groups
    try:
        text = _FORMAT % (
            _string(time_text), _float(ts), _string(record.node), _string(record.client),
            "null" if user is None else _string(user), _string(record.method), _string(record.url), _int(status),
            _int(bytes_in), _int(bytes_out), _float(round(duration, 3)), _string(record.action),
            "null" if rule is None else _string(rule),
            "null" if category is None else _string(category),
            "null" if application is None else _string(application),
            "null" if version is None else _int(version),
            "[]" if dlp == () else _strings(dlp),
            "null" if detail is None else _string(detail),
            "[]" if groups == () else _strings(groups),
            "null" if transfer is None else _string(transfer),
            "null" if tls is None else _string(tls),
        )
    except TypeError:  # a value of another type: the general encoder decides what it becomes
        return None
    return text.encode("ascii")


__all__ = ["json_line"]
