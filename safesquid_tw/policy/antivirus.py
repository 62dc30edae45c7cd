"""The `antivirus` policy section: its validation, defaults and compiled form.

Scanning happens over ICAP (safesquid_tw/icap/); this module only says what to scan, where,
and what to do when no scanner answers.
"""

from __future__ import annotations

from typing import Any

import attrs

from safesquid_tw.icap.codec import parse_service_url
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import (
    check_mime_pattern,
    check_unique_list,
    expect_bool,
    expect_int,
    expect_list,
    expect_object,
    expect_str,
)

FAIL_MODES = ("closed", "open")
OVERSIZE_ACTIONS = ("allow", "block")
MAX_SERVICES = 16
DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "icap_services": [],
    "scan_downloads": True,
    "scan_uploads": True,
    "max_scan_bytes": 32 * 1048576,
    "oversize_action": "allow",
    "skip_mime_types": [],
    "timeout_seconds": 30,
    "fail_mode": "closed",
    "self_test_seconds": 60,
    "verdict_cache_seconds": 3600,
}
_FIELDS = {key: False for key in DEFAULTS}


def _check_service(value: object, path: str) -> str:
    text = expect_str(value, path, max_len=1024)
    try:
        parse_service_url(text)
    except ValueError as e:
        raise PolicyError(path, f"{text!r} {e}") from None
    return text


def validate_antivirus(value: object) -> dict[str, Any]:
    path = "antivirus"
    section = expect_object(value, path, _FIELDS)

    def get(key: str) -> Any:
        return section.get(key, DEFAULTS[key])

    services_path = f"{path}.icap_services"
    services = check_unique_list(expect_list(get("icap_services"), services_path), services_path, _check_service)
    if len(services) > MAX_SERVICES:
        raise PolicyError(services_path, f"at most {MAX_SERVICES} services")
    enabled = expect_bool(get("enabled"), f"{path}.enabled")
    if enabled and not services:
        raise PolicyError(services_path, "needs at least one icap://host:port/service URL when enabled")
    fail_mode = get("fail_mode")
    if fail_mode not in FAIL_MODES:
        raise PolicyError(f"{path}.fail_mode", f"must be 'closed' or 'open', not {fail_mode!r}")
    oversize = get("oversize_action")
    if oversize not in OVERSIZE_ACTIONS:
        raise PolicyError(f"{path}.oversize_action", f"must be 'allow' or 'block', not {oversize!r}")
    mime_path = f"{path}.skip_mime_types"
    return {
        "enabled": enabled,
        "icap_services": services,
        "scan_downloads": expect_bool(get("scan_downloads"), f"{path}.scan_downloads"),
        "scan_uploads": expect_bool(get("scan_uploads"), f"{path}.scan_uploads"),
        "max_scan_bytes": expect_int(get("max_scan_bytes"), f"{path}.max_scan_bytes", minimum=1, maximum=1 << 34),
        "oversize_action": oversize,
        "skip_mime_types": check_unique_list(expect_list(get("skip_mime_types"), mime_path), mime_path,
                                             check_mime_pattern, str.lower),
        "timeout_seconds": expect_int(get("timeout_seconds"), f"{path}.timeout_seconds", minimum=1, maximum=600),
        "fail_mode": fail_mode,
        "self_test_seconds": expect_int(get("self_test_seconds"), f"{path}.self_test_seconds", minimum=5, maximum=86400),
        "verdict_cache_seconds": expect_int(get("verdict_cache_seconds"), f"{path}.verdict_cache_seconds",
                                            minimum=0, maximum=7 * 86400),
    }


@attrs.frozen
class AntivirusRules:
    """The compiled section: plain values and a MIME look-up built once per policy version."""

    enabled: bool
    services: tuple[str, ...]
    scan_downloads: bool
    scan_uploads: bool
    max_scan_bytes: int
    oversize_action: str
    timeout: float
    fail_mode: str
    self_test_seconds: int
    cache_seconds: int
    _skip_exact: frozenset[str]
    _skip_prefixes: tuple[str, ...]

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> "AntivirusRules":
        s = dict(DEFAULTS)
        s.update(section or {})
        exact = frozenset(p.lower() for p in s["skip_mime_types"] if not p.endswith("/*"))
        prefixes = tuple(p[:-1].lower() for p in s["skip_mime_types"] if p.endswith("/*"))
        return cls(
            s["enabled"], tuple(s["icap_services"]), s["scan_downloads"], s["scan_uploads"], s["max_scan_bytes"],
            s["oversize_action"], float(s["timeout_seconds"]), s["fail_mode"], s["self_test_seconds"],
            s["verdict_cache_seconds"], exact, prefixes,
        )

    @property
    def downloads(self) -> bool:
        return self.enabled and self.scan_downloads

    @property
    def uploads(self) -> bool:
        return self.enabled and self.scan_uploads

    def skips(self, content_type: bytes | None) -> bool:
        """Whether a body of this Content-Type is passed unscanned (`skip_mime_types`)."""
        if content_type is None or not (self._skip_exact or self._skip_prefixes):
            return False
        mime = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
        return mime in self._skip_exact or mime.startswith(self._skip_prefixes)


__all__ = ["DEFAULTS", "FAIL_MODES", "OVERSIZE_ACTIONS", "AntivirusRules", "validate_antivirus"]
