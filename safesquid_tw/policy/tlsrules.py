"""The access rule condition `tls`: how a request reached the node.

- `inspected`: a request read from a decrypted (inspected) TLS tunnel, and the CONNECT of a tunnel
  that will be inspected;
- `bypassed`: the CONNECT of a tunnel carried unchanged (spliced: inspection off, or the host,
  category or client in `tls_inspection`'s bypass lists, or auto-bypassed as pinned);
- `plain`: a plain HTTP request (no TLS between client and node).

A CONNECT to an IP address is decided on what the address alone says; once its ClientHello
names the site, a tunnel that is then spliced is decided again with the SNI name and `bypassed`.
Rules are compiled into a bit mask per mode (policy/rules.py); a policy without any `tls`
condition never looks at it.
"""

from __future__ import annotations

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import type_name

TLS_MODES = ("inspected", "bypassed", "plain")


def check_tls_mode(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {type_name(value)}")
    if value.lower() not in TLS_MODES:
        raise PolicyError(path, f"must be one of {', '.join(TLS_MODES)}, not {value!r}")
    return value.lower()


__all__ = ["TLS_MODES", "check_tls_mode"]
