"""Value checkers of the control plane's wire contract, and the error they raise.

Each checker is a frozen spec with one method, ``check(value, where)``, that returns nothing for
a conforming value and raises `WireError` otherwise, naming `where` (the method and argument) and
what was wrong. Types are matched exactly (``type(value) is int``, so ``True`` is no int).
`wire` builds every remote method's contract from these.

Pure module: no Twisted import, tested by tables.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import attrs

# The defaults of the checkers below. `wire` keeps every other limit, and asserts that
# MAX_MESSAGE_BYTES stays under Banana's.
MAX_MESSAGE_BYTES = 512 * 1024  # any single bytes or str value, and one log batch in total
MAX_TEXT = 4096  # free text: error details, status strings
MAX_INT = 2**63 - 1  # versions, sequence numbers, counters: what a signed 64-bit store can hold


class WireError(ValueError):
    """A remote call's argument or result breaks the contract (wrong type, too large, malformed)."""


def _type_name(value: object) -> str:
    return type(value).__name__


@attrs.frozen
class Int:
    lo: int = 0
    hi: int = MAX_INT

    def check(self, value: object, where: str) -> None:
        # bool is an int subclass; True must not pass for a sequence number.
        if type(value) is not int:
            raise WireError(f"{where} must be an int, not {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise WireError(f"{where} must be in {self.lo}..{self.hi}, not {value}")


@attrs.frozen
class Float:
    lo: float = 0.0
    hi: float = float(MAX_INT)

    def check(self, value: object, where: str) -> None:
        if type(value) not in (int, float):
            raise WireError(f"{where} must be a number, not {_type_name(value)}")
        if not math.isfinite(value) or not self.lo <= value <= self.hi:  # type: ignore[arg-type]
            raise WireError(f"{where} must be a finite number in {self.lo}..{self.hi}, not {value}")


@attrs.frozen
class Bool:
    def check(self, value: object, where: str) -> None:
        if type(value) is not bool:
            raise WireError(f"{where} must be a bool, not {_type_name(value)}")


@attrs.frozen
class Bytes:
    max_len: int = MAX_MESSAGE_BYTES
    exact_len: int | None = None

    def check(self, value: object, where: str) -> None:
        if type(value) is not bytes:
            raise WireError(f"{where} must be bytes, not {_type_name(value)}")
        if self.exact_len is not None and len(value) != self.exact_len:
            raise WireError(f"{where} must be exactly {self.exact_len} bytes, not {len(value)}")
        if len(value) > self.max_len:
            raise WireError(f"{where} is {len(value)} bytes, more than {self.max_len}")


@attrs.frozen
class Text:
    max_len: int = MAX_TEXT
    pattern: re.Pattern[str] | None = None
    describe: str = ""

    def check(self, value: object, where: str) -> None:
        if type(value) is not str:
            raise WireError(f"{where} must be a str, not {_type_name(value)}")
        if len(value) > self.max_len:
            raise WireError(f"{where} is {len(value)} characters, more than {self.max_len}")
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            raise WireError(f"{where} must be {self.describe or 'well formed'}, not {value[:80]!r}")


@attrs.frozen
class Remote:
    """A PB remote reference: checked by its one method, so this module needs no Twisted."""

    def check(self, value: object, where: str) -> None:
        if not callable(getattr(value, "callRemote", None)):
            raise WireError(f"{where} must be a remote reference, not {_type_name(value)}")


@attrs.frozen
class NoneValue:
    def check(self, value: object, where: str) -> None:
        if value is not None:
            raise WireError(f"{where} must be None, not {_type_name(value)}")


@attrs.frozen
class ListOf:
    item: Any
    max_items: int
    min_items: int = 0
    max_total_bytes: int | None = None  # sum of len() of bytes/str items

    def check(self, value: object, where: str) -> None:
        if type(value) not in (list, tuple):
            raise WireError(f"{where} must be a list, not {_type_name(value)}")
        if not self.min_items <= len(value) <= self.max_items:  # type: ignore[arg-type]
            count = len(value)  # type: ignore[arg-type]
            raise WireError(f"{where} must hold {self.min_items}..{self.max_items} items, not {count}")
        total = 0
        for i, item in enumerate(value):  # type: ignore[arg-type]
            self.item.check(item, f"{where}[{i}]")
            if self.max_total_bytes is not None:
                total += len(item)
        if self.max_total_bytes is not None and total > self.max_total_bytes:
            raise WireError(f"{where} holds {total} bytes in all, more than {self.max_total_bytes}")


@attrs.frozen
class Record:
    """A dict with exactly these keys (a key listed in `optional` may be left out)."""

    fields: Mapping[str, Any]
    optional: frozenset[str] = frozenset()

    def check(self, value: object, where: str) -> None:
        if type(value) is not dict:
            raise WireError(f"{where} must be a dict, not {_type_name(value)}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise WireError(f"{where} has unknown key {str(unknown[0])[:80]!r}")
        for key, spec in self.fields.items():
            if key in value:
                spec.check(value[key], f"{where}[{key!r}]")
            elif key not in self.optional:
                raise WireError(f"{where} lacks the key {key!r}")


@attrs.frozen
class MapOf:
    key: Any
    value: Any
    max_items: int

    def check(self, value: object, where: str) -> None:
        if type(value) is not dict:
            raise WireError(f"{where} must be a dict, not {_type_name(value)}")
        if len(value) > self.max_items:
            raise WireError(f"{where} holds {len(value)} entries, more than {self.max_items}")
        for k, v in value.items():
            self.key.check(k, f"{where} key")
            self.value.check(v, f"{where}[{k!r}]")



__all__ = [
    "MAX_INT",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT",
    "Bool",
    "Bytes",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "NoneValue",
    "Record",
    "Remote",
    "Text",
    "WireError",
]
