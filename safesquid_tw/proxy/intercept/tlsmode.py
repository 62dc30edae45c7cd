"""The `tls` value an access rule sees for a request (policy/tlsrules.py): `inspected` inside a
decrypted tunnel, `plain` for plain HTTP, and for a CONNECT what will become of its tunnel:
`inspected` when it will be bumped, `bypassed` when it will be spliced.

Asked only when some rule of the policy matches on `tls` (`CompiledPolicy.uses_tls_condition`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.frontdoor import ClientConnection


def tls_mode(conn: "ClientConnection", ctx: "RequestContext") -> str:
    if conn.tls_session is not None:
        return "inspected"
    if ctx.head.method != b"CONNECT":
        return "plain"
    intercept = conn.factory.intercept
    if intercept is None:
        return "bypassed"
    return intercept.mode_for(conn, ctx)


__all__ = ["tls_mode"]
