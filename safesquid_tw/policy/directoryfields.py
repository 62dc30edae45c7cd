"""Validation of `authentication.directory` (LDAP / Active Directory) and groups' `directory_groups`."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import expect_bool, expect_list, expect_object, expect_str, type_name

DIRECTORY_KEYS = {
    "type": False, "urls": True, "start_tls": False, "ca_pem": False, "bind_dn": True,
    "bind_password": True, "user_base": True, "user_filter": True, "principal_filter": False,
    "group_base": False, "group_membership": False, "timeout_seconds": False, "cache_seconds": False,
}
MEMBERSHIP = ("memberOf", "member")
MAX_URLS = 8
MAX_DIRECTORY_GROUPS = 200


def check_directory(value: object, path: str = "authentication.directory") -> dict[str, Any] | None:
    """The directory settings in canonical form (every key present), or None when there are none."""
    if value is None:
        return None
    section = expect_object(value, path, DIRECTORY_KEYS)
    kind = section.get("type", "ldap")
    if kind != "ldap":
        raise PolicyError(f"{path}.type", f"must be \"ldap\" (LDAP and Active Directory), not {kind!r}")
    urls = expect_list(section["urls"], f"{path}.urls", non_empty=True)
    if len(urls) > MAX_URLS:
        raise PolicyError(f"{path}.urls", f"lists more than {MAX_URLS} servers")
    start_tls = expect_bool(section.get("start_tls", False), f"{path}.start_tls")
    checked_urls = [_check_url(url, f"{path}.urls[{i}]", start_tls) for i, url in enumerate(urls)]
    ca_pem = section.get("ca_pem")
    if ca_pem is not None:
        ca_pem = _check_ca(ca_pem, f"{path}.ca_pem")
    user_filter = _check_filter(section["user_filter"], f"{path}.user_filter", "{user}")
    principal_filter = section.get("principal_filter")
    if principal_filter is not None:
        principal_filter = _check_filter(principal_filter, f"{path}.principal_filter", "{principal}")
    membership = section.get("group_membership", "memberOf")
    if membership not in MEMBERSHIP:
        raise PolicyError(f"{path}.group_membership",
                          f"must be \"memberOf\" (user entries list their groups) or \"member\" "
                          f"(group entries list their members), not {membership!r}")
    password = section["bind_password"]
    if not isinstance(password, str) or not password:
        # An empty password is an anonymous bind, which servers accept: it would look like success.
        raise PolicyError(f"{path}.bind_password", "must be a non-empty string")
    user_base = _check_dn(section["user_base"], f"{path}.user_base")
    return {
        "type": "ldap",
        "urls": checked_urls,
        "start_tls": start_tls,
        "ca_pem": ca_pem,
        "bind_dn": _check_dn(section["bind_dn"], f"{path}.bind_dn"),
        "bind_password": expect_str(password, f"{path}.bind_password", max_len=1024),
        "user_base": user_base,
        "user_filter": user_filter,
        "principal_filter": principal_filter,
        "group_base": _check_dn(section.get("group_base", user_base), f"{path}.group_base"),
        "group_membership": membership,
        "timeout_seconds": _seconds(section.get("timeout_seconds", 5), f"{path}.timeout_seconds", 0.1, 60),
        "cache_seconds": _seconds(section.get("cache_seconds", 300), f"{path}.cache_seconds", 0, 86400),
    }


def check_directory_groups(value: object, path: str) -> list[str]:
    items = expect_list(value, path)
    if len(items) > MAX_DIRECTORY_GROUPS:
        raise PolicyError(path, f"lists more than {MAX_DIRECTORY_GROUPS} directory groups")
    out: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = expect_str(item, f"{path}[{i}]", max_len=1024).strip()
        if name.lower() in seen:
            raise PolicyError(f"{path}[{i}]", f"{name!r} is listed twice")
        seen.add(name.lower())
        out.append(name)
    return out


def _check_url(value: object, path: str, start_tls: bool) -> str:
    text = expect_str(value, path, max_len=512)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise PolicyError(path, f"is not an LDAP URL ({e})") from None
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise PolicyError(path, f"must look like ldap://host:389 or ldaps://host:636, not {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise PolicyError(path, "must name only a server (no base DN, query or credentials in the URL)")
    if parts.scheme == "ldaps" and start_tls:
        raise PolicyError(path, "ldaps:// is TLS already: use ldap:// with start_tls, or turn start_tls off")
    del port
    return text


def _check_filter(value: object, path: str, placeholder: str) -> str:
    text = expect_str(value, path, max_len=1024).strip()
    if placeholder not in text:
        raise PolicyError(path, f"must contain {placeholder} where the name goes, e.g. (uid={placeholder})")
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            break
    if not text.startswith("(") or depth != 0:
        raise PolicyError(path, "is not an LDAP filter: it must be in parentheses, balanced")
    return text


def _check_dn(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=1024).strip()
    if "=" not in text:
        raise PolicyError(path, f"is not a distinguished name (e.g. dc=example,dc=com), not {text!r}")
    return text


def _check_ca(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=256 * 1024)
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise PolicyError(path, f"is not a PEM certificate bundle ({e})") from None
    if not certificates:
        raise PolicyError(path, "holds no certificate")
    return text


def _seconds(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(path, f"must be a number of seconds, not {type_name(value)}")
    if not low <= value <= high:
        raise PolicyError(path, f"must be between {low:g} and {high:g} seconds, not {value}")
    return value


__all__ = ["check_directory", "check_directory_groups"]
