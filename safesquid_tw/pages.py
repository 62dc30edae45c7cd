"""HTML pages: the proxy's block and error pages and the portal's own pages, from Jinja2 templates.

Autoescaping is on for every template, so a URL, rule name or user name with markup in it renders
as text. Proxy pages are shown by the browser under a foreign origin and cannot link to the
portal's stylesheet, so they carry it in a `<style>` block; `proxy_page_csp()` allows exactly that
block (by its hash) and nothing else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from typing import Any

import jinja2
from markupsafe import Markup

from safesquid_tw.resources import templates_dir

PRODUCT = "safesquid-tw"
STYLESHEET = "style.css"
# A page is not the place to show a multi-kilobyte URL in full.
_MAX_URL_CHARS = 2048

# What a user can do about each error the proxy answers with.
_ADVICE: dict[int, str] = {
    400: "The request was malformed. Check the address for typing errors, then try again. "
    "If the problem persists, the application sending it may be faulty.",
    403: "Access is not allowed by the gateway's policy. Contact your IT administrator if you need it.",
    404: "Check the address for typing errors, or start again from the home page.",
    405: "This address does not accept that kind of request. Go back and try again from a link.",
    407: "The gateway needs your user name and password. Sign in when your browser asks; "
    "if it does not ask, check the proxy settings of your browser or application.",
    413: "What you tried to send is larger than the gateway allows. Send a smaller file, or ask "
    "your IT administrator about the limit.",
    414: "The address is longer than the gateway accepts. Shorten it, or use the site's own links.",
    431: "Your browser sent more header data than the gateway accepts, often too many cookies. "
    "Clear the cookies for this site and try again.",
    500: "The gateway met an unexpected problem. Try again in a moment; if it keeps happening, "
    "tell your IT administrator the time and the node shown below.",
    502: "The gateway could not get a valid answer from the site. The site may be down or "
    "misbehaving; try again later.",
    503: "The service is temporarily unavailable. Wait a moment and try again.",
    504: "The site or its name server did not answer in time. Try again later; if only this "
    "site fails, it may be down.",
}
_DEFAULT_ADVICE = "Try again later. If the problem persists, contact your IT administrator."


def format_utc(epoch: float) -> str:
    """`2026-11-22 03:07:19 UTC`: unambiguous for a user quoting it to a help desk."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def format_duration(seconds: float | None) -> str:
    """`3d 4h 5m`, `12m 3s`, `45s`; `-` when unknown."""
    if seconds is None:
        return "-"
    remaining = int(seconds)
    days, remaining = divmod(remaining, 86400)
    hours, remaining = divmod(remaining, 3600)
    minutes, secs = divmod(remaining, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def with_article(noun: str) -> str:
    """`a rule`, `an application`: the indefinite article a reader expects."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def format_bytes(count: float | int | None) -> str:
    """`512 B`, `1.5 KiB`, `12.3 MiB`, `2.0 GiB`: sizes people read at a glance."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_offset(seconds: float | None) -> str:
    """`+1.2 s`, `-0.3 s`, `0.0 s` (never `-0.0 s`); `-` when unknown."""
    if seconds is None:
        return "-"
    rounded = round(float(seconds), 1)
    if rounded == 0:
        return "0.0 s"
    return f"{rounded:+.1f} s"


def shorten(text: str, limit: int = _MAX_URL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt variable is an error, not an empty string
        auto_reload=False,  # templates are read once per process
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = format_duration
    env.filters["utc"] = format_utc
    env.filters["article"] = with_article
    env.filters["bytes"] = format_bytes
    env.filters["seconds_offset"] = format_offset
    return env


@functools.cache
def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)


@functools.cache
def stylesheet() -> bytes:
    """The stylesheet the portal serves at /static/style.css."""
    return (templates_dir() / STYLESHEET).read_bytes()


@functools.cache
def _inline_css() -> Markup:
    # Markup: the stylesheet is our own file, and escaping would break selectors such as `>`.
    return Markup(stylesheet().decode("utf-8"))


@functools.cache
def proxy_page_csp() -> str:
    """Content-Security-Policy for block and error pages: only their own inline stylesheet."""
    digest = base64.b64encode(hashlib.sha256(stylesheet()).digest()).decode("ascii")
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'none'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def render_template(name: str, **context: Any) -> bytes:
    """Render a portal page; it links the stylesheet at /static/style.css."""
    context.setdefault("inline_css", None)
    context.setdefault("product", PRODUCT)
    return _template(name).render(context).encode("utf-8")


def _render_proxy_page(name: str, context: dict[str, Any]) -> bytes:
    context["inline_css"] = _inline_css()
    context["product"] = PRODUCT
    return _template(name).render(context).encode("utf-8")


def render_block_page(
    *,
    url: str,
    rule: str | None,
    reason: str,
    category: str | None,
    application: str | None,
    node: str,
    policy_version: int | None,
    client: str,
    user: str | None,
    when: float | None = None,
) -> bytes:
    """The page a browser shows for a request the policy denied."""
    return _render_proxy_page(
        "block.html",
        {
            "url": shorten(url),
            "rule": rule,
            "reason": reason,
            "category": category,
            "application": application,
            "node": node,
            "policy_version": policy_version,
            "client": client,
            "user": user,
            "time": format_utc(time.time() if when is None else when),
        },
    )


def render_error_page(
    *,
    status: int,
    title: str,
    detail: str,
    url: str | None,
    node: str,
    when: float | None = None,
    linked_css: bool = False,
) -> bytes:
    """The page for a request the gateway could not serve (400, 407, 502, 504, ...).

    `linked_css=True` is for the portal's own errors: the page links /static/style.css, as the
    portal's Content-Security-Policy allows no inline style.
    """
    context = {
        "status": status,
        "title": title,
        "detail": detail,
        "url": None if url is None else shorten(url),
        "node": node,
        "advice": _ADVICE.get(status, _DEFAULT_ADVICE),
        "time": format_utc(time.time() if when is None else when),
    }
    if linked_css:
        return render_template("error.html", **context)
    return _render_proxy_page("error.html", context)


__all__ = [
    "format_duration",
    "format_utc",
    "proxy_page_csp",
    "render_block_page",
    "render_error_page",
    "render_template",
    "stylesheet",
]
