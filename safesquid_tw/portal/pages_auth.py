"""Login, logout, the home page, administrator accounts, API tokens and the audit trail."""

from __future__ import annotations

import hmac
import math

from typing import Any

from safesquid_tw.portal.accounts import AccountError
from safesquid_tw.portal.sessions import new_secret
from safesquid_tw.portal.tokens import TokenError
from safesquid_tw.portal.web import Call, Error, Page, Redirect, Reply, Route, route, safe_next, set_session_cookie
from safesquid_tw.portal.worklimit import Busy

LOGIN_COOKIE = b"safesquid_login"


def _login_page(call: Call, *, error: str | None = None, name: str = "", code: int = 200) -> Page:
    # Login forms carry their own CSRF token, bound to a short-lived cookie (there is no session
    # yet): a page elsewhere cannot log a browser into an account of the attacker's choosing.
    token = new_secret()
    parts = [LOGIN_COOKIE + b"=" + token.encode(), b"Path=/login", b"HttpOnly", b"SameSite=Strict", b"Max-Age=3600"]
    if call.request.isSecure():
        parts.append(b"Secure")
    call.request.responseHeaders.addRawHeader(b"Set-Cookie", b"; ".join(parts))
    return Page("portal/login.html", {"login_token": token, "error": error, "account_name": name,
                                      "next": safe_next(call.form.get("next", "/"))}, code=code)


async def login_form(call: Call) -> Reply:
    if call.session is not None:
        return Redirect(safe_next(call.form.get("next", "/")))
    return _login_page(call)


async def login(call: Call) -> Reply:
    services, form = call.services, call.form
    cookie = (call.request.getCookie(LOGIN_COOKIE) or b"").decode("ascii", "replace")
    if not cookie or not hmac.compare_digest(cookie.encode(), form.get("login_token").encode()):
        return Error(403, "Form refused", "The login form has expired or was not sent from this portal. "
                     "Reload the login page and try again.")
    name, password = form.get("name").strip(), form.get("password")
    address = call.address or "-"
    wait = services.throttle.wait(name, address)
    if wait > 0:
        seconds = math.ceil(wait)
        call.request.setHeader(b"Retry-After", b"%d" % seconds)
        services.refusals.refused(name, address, "throttled", wait_s=seconds)
        return _login_page(call, name=name, code=429,
                           error=f"Too many failed logins: wait {seconds} s before trying again.")
    if not services.throttle.begin(name, address):
        call.request.setHeader(b"Retry-After", b"1")
        services.refusals.refused(name, address, "another attempt in flight")
        return _login_page(call, name=name, code=429,
                           error="Another login for this account or from your address is being checked: "
                           "wait a second before trying again.")
    try:
        ok = bool(name) and bool(password) and await services.passwords.run(services.accounts.verify, name, password)
    except Busy:
        services.refusals.refused(name, address, "password checks busy")
        call.request.setHeader(b"Retry-After", b"2")
        return _login_page(call, name=name, code=503,
                           error="The portal is checking many logins right now: try again in a few seconds.")
    finally:
        services.throttle.end(name, address)
    if not ok:
        wait = services.throttle.failed(name, address)
        # In a worker thread: the audit line is fsynced, and a login flood must not stall the reactor.
        await services.in_thread(services.audit.record, "login", actor=name, address=address, outcome="failed")
        return _login_page(call, name=name, code=401,
                           error=f"Wrong name or password. The next try is possible in {math.ceil(wait)} s.")
    services.throttle.succeeded(name, address)
    session = services.sessions.create(name, address)
    set_session_cookie(call.request, session.id)
    call.request.responseHeaders.addRawHeader(b"Set-Cookie", LOGIN_COOKIE + b"=; Path=/login; Max-Age=0")
    await services.in_thread(services.audit.record, "login", actor=name, address=address, outcome="ok")
    return Redirect(safe_next(form.get("next", "/")))


async def logout(call: Call) -> Reply:
    session = call.session
    assert session is not None
    call.services.sessions.end(session.id)
    set_session_cookie(call.request, "", max_age=0)
    call.services.audit.record("logout", actor=session.account, address=call.address)
    return Redirect("/login")


async def home(call: Call) -> Reply:
    ctx = call.services.ctx
    state = ctx.state
    current = ctx.store.current
    draft = await call.services.in_thread(call.services.drafts.load, call.account)
    nodes = ctx.registry.snapshot(current.version if current else None) if ctx.registry is not None else []
    return Page("portal/home.html", {
        "state": state,
        "status": state.status,
        "uptime_s": state.uptime_s,
        "policy": current,
        "draft": draft,
        "nodes": nodes,
        "nodes_with_warnings": sum(1 for n in nodes if n["warnings"]),
    })


async def _verify(services: Any, name: str, password: str) -> bool:
    try:
        return await services.passwords.run(services.accounts.verify, name, password)
    except Busy:
        return False


# -- accounts ------------------------------------------------------------------------------------


def _accounts_page(call: Call, *, errors: dict[str, str] | None = None, values: dict[str, str] | None = None,
                   code: int = 200) -> Page:
    return Page("portal/accounts.html", {
        "accounts": [a.public() for a in call.services.accounts.accounts()],
        "errors": errors or {}, "values": values or {}}, code=code)


async def accounts_page(call: Call) -> Reply:
    return _accounts_page(call)


async def add_account(call: Call) -> Reply:
    services, form = call.services, call.form
    name, password = form.get("name").strip(), form.get("password")
    if password != form.get("password2"):
        return _accounts_page(call, errors={"password2": "the two passwords differ"}, values={"name": name}, code=422)
    try:
        await services.passwords.run(services.accounts.add, name, password, by=call.account)
    except AccountError as e:
        return _accounts_page(call, errors={e.field: e.message}, values={"name": name}, code=422)
    except Busy:
        return _accounts_page(call, errors={"password": "the portal is busy checking passwords: try again"},
                              values={"name": name}, code=503)
    services.audit.record("account_add", actor=call.account, address=call.address, account=name)
    call.session.flash("ok", f"Account {name} created.")
    return Redirect("/accounts")


async def remove_account(call: Call) -> Reply:
    services, name = call.services, call.params["name"]
    if name == call.account:
        call.session.flash("error", "You cannot remove your own account.")
        return Redirect("/accounts")
    try:
        await services.in_thread(services.accounts.remove, name)
    except AccountError as e:
        call.session.flash("error", e.message)
        return Redirect("/accounts")
    services.sessions.end_account(name)
    services.audit.record("account_remove", actor=call.account, address=call.address, account=name)
    call.session.flash("ok", f"Account {name} removed; its sessions ended.")
    return Redirect("/accounts")


async def set_password(call: Call) -> Reply:
    """An administrator sets their own password, or (for a restored account) another's."""
    services, form = call.services, call.form
    target = form.get("account", call.account) or call.account
    new, again = form.get("new_password"), form.get("new_password2")
    errors: dict[str, str] = {}
    if new != again:
        errors["new_password2"] = "the two passwords differ"
    elif target == call.account:
        if not await _verify(services, call.account, form.get("current_password")):
            errors["current_password"] = "this is not your current password"
    else:
        other = services.accounts.get(target)
        if other is None or other.password_hash is not None:
            errors["new_password"] = "only accounts without a password (restored from a backup) can be set here"
    if not errors:
        try:
            await services.passwords.run(services.accounts.set_password, target, new)
        except AccountError as e:
            errors["new_password"] = e.message
        except Busy:
            errors["new_password"] = "the portal is busy checking passwords: try again in a few seconds"
    if errors:
        return _accounts_page(call, errors=errors, code=422)
    services.sessions.end_account(target, keep=call.session.id)
    services.audit.record("password_change", actor=call.account, address=call.address, account=target)
    call.session.flash("ok", f"Password of {target} changed; its other sessions ended.")
    return Redirect("/accounts")


# -- API tokens ----------------------------------------------------------------------------------


def _tokens_page(call: Call, *, new_token: str | None = None, error: str | None = None, code: int = 200) -> Page:
    return Page("portal/tokens.html", {
        "tokens": [t.public() for t in call.services.tokens.tokens()], "new_token": new_token, "error": error,
    }, code=code)


async def tokens_page(call: Call) -> Reply:
    return _tokens_page(call)


async def create_token(call: Call) -> Reply:
    services = call.services
    try:
        info, secret = await services.in_thread(services.tokens.create, call.form.get("name"), by=call.account)
    except TokenError as e:
        return _tokens_page(call, error=e.message, code=422)
    services.audit.record("token_create", actor=call.account, address=call.address, token=info.id, name=info.name)
    # Shown in this response only: the page is not cached, and the store keeps just a digest.
    return _tokens_page(call, new_token=secret)


async def revoke_token(call: Call) -> Reply:
    services = call.services
    try:
        info = await services.in_thread(services.tokens.revoke, call.params["id"])
    except TokenError as e:
        call.session.flash("error", e.message)
        return Redirect("/tokens")
    services.audit.record("token_revoke", actor=call.account, address=call.address, token=info.id, name=info.name)
    call.session.flash("ok", f"Token {info.name} revoked.")
    return Redirect("/tokens")


async def audit_page(call: Call) -> Reply:
    entries = await call.services.in_thread(call.services.audit.tail, 200)
    return Page("portal/audit.html", {"entries": entries})


ROUTES: list[Route] = [
    route("GET", "/login", login_form, login=False),
    route("POST", "/login", login, login=False),
    route("POST", "/logout", logout),
    route("GET", "/", home),
    route("GET", "/accounts", accounts_page),
    route("POST", "/accounts/add", add_account),
    route("POST", "/accounts/password", set_password),
    route("POST", "/accounts/{name}/remove", remove_account),
    route("GET", "/tokens", tokens_page),
    route("POST", "/tokens/create", create_token),
    route("POST", "/tokens/{id}/revoke", revoke_token),
    route("GET", "/audit", audit_page),
]

__all__ = ["ROUTES"]
