import base64
import hashlib
import re

import pytest

from safesquid_tw.pages import (
    format_duration,
    proxy_page_csp,
    render_block_page,
    render_error_page,
    render_template,
    stylesheet,
)

HOSTILE = '<script>alert("x")</script>'


def block_page(**overrides) -> str:
    fields = dict(
        url="http://games.example/play",
        rule="block-games",
        reason="Games are not allowed during work hours",
        category="games",
        application=None,
        node="gw1",
        policy_version=12,
        client="10.1.2.3",
        user="alice",
        when=1795316839,
    )
    fields.update(overrides)
    return render_block_page(**fields).decode("utf-8")


def test_block_page_shows_the_facts():
    page = block_page()
    for text in ("Access blocked", "http://games.example/play", "block-games",
                 "Games are not allowed during work hours", "games", "gw1", "12", "10.1.2.3", "alice",
                 "2026-11-22 03:07:19 UTC"):
        assert text in page


@pytest.mark.parametrize("field", ["url", "rule", "reason", "category", "application", "node", "client", "user"])
def test_block_page_escapes_hostile_values(field):
    page = block_page(**{field: HOSTILE})
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page


def test_block_page_without_optional_values():
    page = block_page(rule=None, category=None, application=None, user=None, policy_version=None)
    assert "Default policy" in page
    assert "Category" not in page and "User" not in page


def test_very_long_urls_are_shortened():
    page = block_page(url="http://x/" + "a" * 10000)
    assert "a" * 2000 in page and "a" * 2100 not in page


@pytest.mark.parametrize("status", [400, 403, 404, 405, 407, 413, 414, 431, 500, 502, 503, 504])
def test_error_pages(status):
    page = render_error_page(status=status, title="Some title", detail=HOSTILE, url=HOSTILE, node="gw1").decode()
    assert f"Error {status}" in page
    assert "What you can do" in page
    assert "<script>" not in page
    assert "Try again later. If the problem persists" not in page  # each has its own advice


def test_error_page_for_an_unlisted_status_has_generic_advice():
    page = render_error_page(status=418, title="Odd", detail="d", url=None, node="n").decode()
    assert "Try again later" in page
    assert "Address" not in page


def _inline_style(page: str) -> str:
    match = re.search(r"<style>(.*?)</style>", page, re.S)
    assert match, "proxy pages carry their stylesheet inline"
    return match.group(1)


def test_proxy_pages_embed_the_stylesheet_allowed_by_their_csp():
    for page in (block_page(), render_error_page(status=502, title="t", detail="d", url=None, node="n").decode()):
        css = _inline_style(page)
        assert css.encode() == stylesheet()
        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in proxy_page_csp()
        assert "<link" not in page


def test_no_external_resources():
    pages = [block_page(), render_error_page(status=504, title="t", detail="d", url=None, node="n").decode(),
             render_template("status.html", node="n", role="master", ready=True, status="ready",
                             policy_version=1, policy_digest="d", policy_source="file", uptime_s=5).decode()]
    for page in pages + [stylesheet().decode()]:
        assert "http://" not in page.replace("http://games.example/play", "")
        assert "https://" not in page
        assert "@import" not in page and "url(" not in page
        assert "<script" not in page


def test_portal_error_page_links_the_stylesheet():
    page = render_error_page(status=404, title="Not found", detail="d", url="/x", node="n", linked_css=True).decode()
    assert '<link rel="stylesheet" href="/static/style.css">' in page
    assert "<style>" not in page


def test_status_page():
    page = render_template(
        "status.html", node="gw<1>", role="slave", ready=False, status="draining",
        policy_version=None, policy_digest=None, policy_source=None, uptime_s=3725,
    ).decode()
    assert "gw&lt;1&gt;" in page and "gw<1>" not in page
    assert "Not ready: draining" in page
    assert "none loaded" in page
    assert "1h 2m 5s" in page


def test_a_missing_template_variable_is_an_error():
    with pytest.raises(Exception, match="undefined"):
        render_template("status.html", node="n")


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "-"), (0, "0s"), (59.9, "59s"), (61, "1m 1s"), (3600, "1h 0m 0s"), (90061, "1d 1h 1m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
