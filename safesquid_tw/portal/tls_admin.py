"""TLS inspection in the portal and the API: the inspection CA (its certificate, installation
help, replacement by the organisation's own CA, audited) and the clients that reject it (pinned
apps), each with a one-click bypass.

The CA key is accepted here (replacement) but never shown, returned, logged or audited: only the
certificate's subject and fingerprint are.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.portal.web import Call, Error, Json, Page, Redirect, Reply, route
from safesquid_tw.proxy.intercept.ca import CAError, parse_ca

PINNED_DETAIL = "the client rejected the inspection certificate%"
PINNED_WINDOW = 7 * 86400.0


def ca_view(ctx: Any) -> dict[str, Any] | None:
    store = ctx.ca_store
    ca = store.current if store is not None else None
    if ca is None:
        return None
    return {
        "subject": ca.subject,
        "fingerprint": ca.fingerprint,
        "fingerprint_colons": ":".join(ca.fingerprint[i:i + 2].upper() for i in range(0, 64, 2)),
        "not_after": ca.not_after.strftime("%Y-%m-%d"),
        "certificate": ca.cert_pem.decode("ascii"),
    }


def replace_ca(services: Any, cert_pem: bytes, key_pem: bytes, *, actor: str, address: str | None, via: str) -> dict:
    """Check and install a new CA (raises CAError with the reason); audited with its fingerprint."""
    ctx = services.ctx
    if ctx.history is None or ctx.ca_store is None:
        raise CAError("this node uses its master's inspection CA: replace it on the master")
    ca = parse_ca(cert_pem, key_pem)
    before = ctx.ca_store.current
    ctx.ca_store.replace(ca)
    services.audit.record("tls_ca_replace", actor=actor, address=address, via=via, subject=ca.subject,
                          fingerprint=ca.fingerprint, previous=before.fingerprint if before else None)
    return ca_view(ctx)


def pinned_hosts(reports: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Hosts whose clients rejected the inspection certificate lately, most rejected first
    (from the access records of every node)."""
    if reports is None:
        return []
    since = (now or time.time()) - PINNED_WINDOW
    rows = reports.reader().execute(
        "SELECT host, count(*), max(time), count(DISTINCT client) FROM requests"
        " WHERE time >= ? AND method = 'CONNECT' AND detail LIKE ? GROUP BY host ORDER BY count(*) DESC LIMIT 100",
        (since, PINNED_DETAIL),
    )
    return [{"host": h, "rejections": n, "last": last, "clients": c} for h, n, last, c in rows]


def add_bypass(services: Any, host: str, *, actor: str, address: str | None) -> int:
    """A new policy version with `host` in tls_inspection.bypass_domains; returns its number."""
    ctx = services.ctx
    if ctx.history is None:
        raise PolicyError("tls_inspection.bypass_domains", "this node's policy is managed by its master")
    current = ctx.store.current
    if current is None:
        raise PolicyError("(document)", "there is no policy yet")
    document = copy.deepcopy(current.document)
    section = document.setdefault("tls_inspection", {})
    domains = section.setdefault("bypass_domains", [])
    if host not in domains:
        domains.append(host)
    policy = ctx.history.apply(document, by=actor, comment=f"TLS inspection bypass for {host} (pinned clients)",
                               source="portal")
    services.audit.record("tls_bypass_add", actor=actor, address=address, host=host, version=policy.version)
    return policy.version


# -- portal pages -------------------------------------------------------------------------------

async def tls_page(call: Call) -> Reply:
    ctx = call.services.ctx
    pinned = await call.services.in_thread(pinned_hosts, ctx.reports, ctx.now()) if ctx.reports is not None else []
    current = ctx.store.current
    section = (current.document.get("tls_inspection") or {}) if current is not None else {}
    return Page("portal/tls.html", {"ca": ca_view(ctx), "pinned": pinned, "section": section,
                                    "read_only": ctx.history is None, "error": None})


async def tls_replace_ca(call: Call) -> Reply:
    try:
        replace_ca(call.services, call.form.get("certificate").encode(), call.form.get("key").encode(),
                   actor=call.account, address=call.address, via="portal")
    except CAError as e:
        call.session.flash("error", f"The CA was not replaced: {e}")
        return Redirect("/tls")
    call.session.flash("ok", "The inspection CA was replaced; slaves receive it now, and clients need the new certificate.")
    return Redirect("/tls")


async def tls_bypass(call: Call) -> Reply:
    host = call.form.get("host").strip().lower()
    try:
        version = add_bypass(call.services, host, actor=call.account, address=call.address)
    except PolicyError as e:
        call.session.flash("error", f"{host} was not added: {e}")
        return Redirect("/tls")
    call.session.flash("ok", f"{host} is no longer inspected (policy version {version}).")
    return Redirect("/tls")


# -- API ----------------------------------------------------------------------------------------

async def api_get_ca(call: Call) -> Reply:
    view = ca_view(call.services.ctx)
    if view is None:
        return Json({"error": "this node has no inspection CA yet"}, code=404)
    return Json(view)


async def api_put_ca(call: Call) -> Reply:
    from safesquid_tw.portal.api import read_json

    body = await read_json(call)
    cert, key = body.get("certificate"), body.get("key")
    if not isinstance(cert, str) or not isinstance(key, str):
        return Json({"error": "the body needs 'certificate' and 'key', both PEM text"}, code=400)
    if call.services.ctx.history is None:
        return Json({"error": "read-only: this node uses its master's inspection CA"}, code=409)
    try:
        view = replace_ca(call.services, cert.encode(), key.encode(), actor=call.actor, address=call.address, via="api")
    except CAError as e:
        return Json({"error": "the CA cannot be used", "message": str(e)}, code=422)
    return Json(view)


async def api_pinned(call: Call) -> Reply:
    ctx = call.services.ctx
    hosts = await call.services.in_thread(pinned_hosts, ctx.reports, ctx.now()) if ctx.reports is not None else []
    return Json({"hosts": hosts})


PAGE_ROUTES = [
    route("GET", "/tls", tls_page),
    route("POST", "/tls/ca", tls_replace_ca),
    route("POST", "/tls/bypass", tls_bypass),
]
API_ROUTES = [
    route("GET", "/api/v1/tls/ca", api_get_ca),
    route("PUT", "/api/v1/tls/ca", api_put_ca),
    route("GET", "/api/v1/tls/pinned", api_pinned),
]

__all__ = ["API_ROUTES", "PAGE_ROUTES", "add_bypass", "ca_view", "pinned_hosts", "replace_ca"]
