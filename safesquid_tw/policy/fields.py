"""Checks for single fields of a policy document, each raising PolicyError at the field's path.

Every checker takes the raw JSON value and its path and returns the value to keep in the
canonical document. Values are kept as written (compilation normalises case and form), so the
document an administrator reads back is the document they wrote, plus defaults.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any

import argon2

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.hosts import parse_domain_pattern

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 token: methods, header names
_MIME_PART = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
_EXTENSION = re.compile(r"[A-Za-z0-9_+-]{1,32}\Z")
_TIME = re.compile(r"(\d\d):(\d\d)\Z")
_PORT_RANGE = re.compile(r"(\d{1,5})-(\d{1,5})\Z")
_NAME_MAX = 64

# Ceilings for the cost of one password verification: a policy must not be able to make
# every login take seconds or gigabytes.
MAX_ARGON2_MEMORY_KIB = 262144
MAX_ARGON2_TIME_COST = 16
MAX_ARGON2_PARALLELISM = 16


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def expect_object(value: object, path: str, fields: Mapping[str, bool]) -> dict[str, Any]:
    """An object whose keys are all among `fields` (name -> required)."""
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object, not {type_name(value)}")
    for key in value:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise PolicyError(_join(path, key), f"unknown key (known keys: {known})")
    for key, required in fields.items():
        if required and key not in value:
            raise PolicyError(_join(path, key), "is required")
    return value


def _join(path: str, key: str) -> str:
    return key if path == "(document)" else f"{path}.{key}"


def expect_list(value: object, path: str, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(path, f"must be a list, not {type_name(value)}")
    if non_empty and not value:
        raise PolicyError(path, "must not be empty (leave the key out to match anything)")
    return value


def expect_str(value: object, path: str, *, max_len: int = 4096, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {type_name(value)}")
    if not allow_empty and not value.strip():
        raise PolicyError(path, "must not be empty")
    if len(value) > max_len:
        raise PolicyError(path, f"is longer than {max_len} characters")
    return value


def expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(path, f"must be true or false, not {type_name(value)}")
    return value


def expect_int(value: object, path: str, *, minimum: int, maximum: int | None = None,
               nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    # bool is an int subclass in Python, but `true` is no size.
    if type(value) is not int:
        expected = "an integer or null" if nullable else "an integer"
        raise PolicyError(path, f"must be {expected}, not {type_name(value)}")
    if value < minimum:
        raise PolicyError(path, f"must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise PolicyError(path, f"must be at most {maximum}, not {value}")
    return value


def check_name(value: object, path: str) -> str:
    """Names of rules, groups, users, categories, applications and detectors."""
    name = expect_str(value, path, max_len=_NAME_MAX)
    if name != name.strip() or any(not ch.isprintable() for ch in name):
        raise PolicyError(path, f"{name!r} must not have surrounding blanks or control characters")
    return name


def check_domain(value: object, path: str) -> str:
    pattern = expect_str(value, path, max_len=300)
    try:
        parse_domain_pattern(pattern)
    except ValueError as e:
        raise PolicyError(path, str(e)) from None
    return pattern


def check_network(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=64)
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise PolicyError(path, f"{text!r} is not an IP address or CIDR network ({e})") from None
    return text


def check_port(value: object, path: str) -> int | str:
    """A port number, or (in rule conditions) a `"low-high"` range given as a string."""
    if isinstance(value, str):
        match = _PORT_RANGE.match(value)
        if not match:
            raise PolicyError(path, f"{value!r} is not a 'low-high' port range (write single ports as numbers)")
        low, high = int(match.group(1)), int(match.group(2))
        if not (1 <= low <= high <= 65535):
            raise PolicyError(path, f"{value!r} must satisfy 1 <= low <= high <= 65535")
        return value
    if type(value) is not int or not 1 <= value <= 65535:
        raise PolicyError(path, f"{value!r} is not a port (1 to 65535)")
    return value


def check_single_port(value: object, path: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise PolicyError(path, f"{value!r} is not a port (1 to 65535)")
    return value


def check_method(value: object, path: str) -> str:
    method = expect_str(value, path, max_len=32)
    if not _TOKEN.match(method):
        raise PolicyError(path, f"{method!r} is not an HTTP method")
    return method


def check_shell_pattern(value: object, path: str) -> str:
    pattern = expect_str(value, path, max_len=2048)
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as e:
        raise PolicyError(path, f"{pattern!r} is not a valid pattern ({e})") from None
    return pattern


def check_regex(value: object, path: str) -> str:
    pattern = expect_str(value, path, max_len=4096)
    try:
        re.compile(pattern)
    except re.error as e:
        raise PolicyError(path, f"{pattern!r} is not a valid regular expression ({e})") from None
    return pattern


def check_mime_pattern(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=255)
    major, slash, minor = text.lower().partition("/")
    if not slash or not _MIME_PART.match(major) or major == "*" or not (
        minor == "*" or _MIME_PART.match(minor)
    ):
        raise PolicyError(path, f"{text!r} is not a MIME type pattern (type/subtype or type/*)")
    return text


def check_extension(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=32)
    if not _EXTENSION.match(text):
        raise PolicyError(path, f"{text!r} is not a file extension (write it without the dot, e.g. 'exe')")
    return text


def check_header_name(name: str, path: str) -> str:
    if not _TOKEN.match(name):
        raise PolicyError(path, f"{name!r} is not a header name")
    if name != name.lower():
        raise PolicyError(path, f"header names are written in lower case ({name.lower()!r})")
    return name


def check_time(value: object, path: str, *, end: bool) -> str:
    """`HH:MM`; an end time may also be `24:00` (the end of the day)."""
    text = expect_str(value, path, max_len=64)
    match = _TIME.match(text)
    ok = False
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        ok = (hours < 24 and minutes < 60) or (end and hours == 24 and minutes == 0)
    if not ok:
        latest = "24:00" if end else "23:59"
        raise PolicyError(path, f"{text!r} is not a time (HH:MM, 00:00 to {latest})")
    return text


def time_to_minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def check_day(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=64)
    if text not in DAYS:
        raise PolicyError(path, f"{text!r} is not a day ({', '.join(DAYS)})")
    return text


def check_timezone(value: object, path: str) -> str:
    name = expect_str(value, path, max_len=64)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise PolicyError(path, f"{name!r} is not a known IANA time zone ({e})") from None
    return name


def check_password_hash(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=512)
    hint = "make one with: python -m safesquid_tw.policy.hashpw"
    if not text.startswith("$argon2id$"):
        raise PolicyError(path, f"must be an argon2id hash ($argon2id$...); other formats are not accepted; {hint}")
    try:
        params = argon2.extract_parameters(text)
    except argon2.exceptions.InvalidHashError:
        raise PolicyError(path, f"is not a well-formed argon2id hash; {hint}") from None
    if params.memory_cost > MAX_ARGON2_MEMORY_KIB or params.time_cost > MAX_ARGON2_TIME_COST or (
        params.parallelism > MAX_ARGON2_PARALLELISM
    ):
        raise PolicyError(
            path,
            f"argon2id parameters m={params.memory_cost},t={params.time_cost},p={params.parallelism} are "
            f"too costly for a proxy login (at most m={MAX_ARGON2_MEMORY_KIB},t={MAX_ARGON2_TIME_COST},"
            f"p={MAX_ARGON2_PARALLELISM}); {hint}",
        )
    return text


def check_unique_list(values: list[Any], path: str, checker: Callable[[Any, str], Any],
                      key: Callable[[Any], Any] = lambda value: value) -> list[Any]:
    """Check each item (at path[i]) and refuse repeats, which are always a slip of the pen.

    `key` gives the form in which two items count as the same (e.g. lower-cased).
    """
    seen: dict[Any, int] = {}
    out = []
    for i, item in enumerate(values):
        checked = checker(item, f"{path}[{i}]")
        key_value = key(checked)
        if key_value in seen:
            raise PolicyError(f"{path}[{i}]", f"{checked!r} is listed twice (also at [{seen[key_value]}])")
        seen[key_value] = i
        out.append(checked)
    return out


__all__ = [
    "DAYS",
    "check_day",
    "check_domain",
    "check_extension",
    "check_header_name",
    "check_method",
    "check_mime_pattern",
    "check_name",
    "check_network",
    "check_password_hash",
    "check_port",
    "check_regex",
    "check_shell_pattern",
    "check_single_port",
    "check_time",
    "check_timezone",
    "check_unique_list",
    "expect_bool",
    "expect_int",
    "expect_list",
    "expect_object",
    "expect_str",
    "time_to_minutes",
    "type_name",
]
