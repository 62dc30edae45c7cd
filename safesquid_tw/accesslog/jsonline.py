"""An access record's JSON line written directly, byte for byte what the general encoder makes.

Every request and every CONNECT tunnel ends with one record; building a dict of 22 keys and
running it through ``json.JSONEncoder`` costs more than the rest of the record's life. Here the
line is one f-string with each string escaped by the C escaper the encoder itself uses
(``encode_basestring_ascii``) and numbers as the encoder writes them (``int.__repr__``,
``float.__repr__``). Anything unusual (a value of another type, a float that is not finite) gets
None back, and the caller uses the general encoder, which raises the error it always raised.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring_ascii as _quoted
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safesquid_tw.accesslog.record import AccessRecord

_isfinite = math.isfinite
_float = float.__repr__
_int = int.__repr__


def _text_or_null(value) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, str):
        return _quoted(value)
    return None


def _names(values) -> str | None:
    if not values:
        return "[]"
    for value in values:
        if not isinstance(value, str):
            return None
    return "[" + ",".join(map(_quoted, values)) + "]"


def encode(record: "AccessRecord", time_text: str) -> bytes | None:
    """The record's line with `time_text` as its "time", or None for the general encoder."""
    ts = record.time
    duration = round(record.duration_ms, 3)
    status, bytes_in, bytes_out = record.status, record.bytes_in, record.bytes_out
    version = record.policy_version
    if (type(ts) is not float or type(duration) is not float or not _isfinite(ts) or not _isfinite(duration)
            or type(status) is not int or type(bytes_in) is not int or type(bytes_out) is not int
            or (version is not None and type(version) is not int)):
        return None
    node, client, method, url, action = record.node, record.client, record.method, record.url, record.action
    if not (isinstance(node, str) and isinstance(client, str) and isinstance(method, str)
            and isinstance(url, str) and isinstance(action, str)):
        return None
    user = _text_or_null(record.user)
    rule = _text_or_null(record.rule)
    category = _text_or_null(record.category)
    application = _text_or_null(record.application)
    detail = _text_or_null(record.detail)
    transfer = _text_or_null(record.transfer)
    tls = _text_or_null(record.tls)
    dlp = _names(record.dlp)
    groups = _names(record.groups)
    if None in (user, rule, category, application, detail, transfer, tls, dlp, groups):
        return None
    return (
        f'{{"time":{_quoted(time_text)},"ts":{_float(ts)},"node":{_quoted(node)},"client":{_quoted(client)},'
        f'"user":{user},"method":{_quoted(method)},"url":{_quoted(url)},"status":{_int(status)},'
        f'"bytes_in":{_int(bytes_in)},"bytes_out":{_int(bytes_out)},"duration_ms":{_float(duration)},'
        f'"action":{_quoted(action)},"rule":{rule},"category":{category},"application":{application},'
        f'"policy_version":{"null" if version is None else _int(version)},"dlp":{dlp},"detail":{detail},'
        f'"groups":{groups},"transfer":{transfer},"tls":{tls}}}\n'
    ).encode("ascii")
