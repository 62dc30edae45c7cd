"""Percent-escapes in one spelling (RFC 3986 6.2.2.1, 6.2.2.2): shared by request paths and the
URL and path patterns of a policy, so that a pattern and a path written differently still meet."""

from __future__ import annotations

__all__ = ["normal_escapes"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# "%xx" in any case -> what it becomes: the character itself when unreserved, else upper-case hex.
_ESCAPES: dict[str, str] = {}
for _code in range(256):
    _upper = f"{_code:02X}"
    _value = chr(_code) if _code in _UNRESERVED else f"%{_upper}"
    for _spelling in {_upper, _upper.lower(), _upper[0] + _upper[1].lower(), _upper[0].lower() + _upper[1]}:
        _ESCAPES[_spelling] = _value
del _code, _upper, _value, _spelling


def normal_escapes(text: str) -> str:
    """Decode escapes of unreserved characters, upper-case the others; a stray ``%`` stays."""
    if "%" not in text:
        return text
    pieces = text.split("%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        replacement = _ESCAPES.get(piece[:2])
        if replacement is None:
            out.append("%" + piece)
        else:
            out.append(replacement + piece[2:])
    return "".join(out)
