"""The literal prefilter of URL-pattern rules never rules out a URL some pattern matches."""

from __future__ import annotations

import attrs
import pytest

from safesquid_tw.policy.rules import required_literal
from .test_engine import BASE, compiled

PATTERNS = ["*/ads/*", "*.SWF", "http://tracker.example/p?x=*", "*/img??/*.gif", "*/%7Euser/*"]
URLS = [
    ("/ads/x", "ads"), ("/a/ADS/b", "ads"), ("/movie.swf", "swf"), ("/img01/a.gif", "img"),
    ("/img1/a.gif", None), ("/~user/page", "tilde"), ("/index.html", None), ("/adsx/", None),
]


@pytest.mark.parametrize(("pattern", "expected"), [
    ("*/ads/*", "/ads/"), ("*.swf", ".swf"), ("*", None), ("*?*", None), ("a*bcd?e", "bcd"),
    ("*[abc]x*", None), ("exact", "exact"),
])
def test_required_literal(pattern: str, expected: str | None) -> None:
    assert required_literal(pattern) == expected


@pytest.mark.parametrize(("path", "rule"), URLS)
def test_decisions_are_those_of_the_patterns(path: str, rule: str | None) -> None:
    names = ["ads", "swf", "tracker", "img", "tilde"]
    policy = compiled([{"name": n, "action": "deny", "url_patterns": [p]} for n, p in zip(names, PATTERNS)])
    assert policy._rules.url_prefilter is not None
    assert policy.decide(attrs.evolve(BASE, path=path)).rule == rule


def test_a_pattern_without_a_literal_turns_the_filter_off() -> None:
    policy = compiled([
        {"name": "any", "action": "deny", "url_patterns": ["*"], "methods": ["POST"]},
        {"name": "set", "action": "deny", "url_patterns": ["*/[xy]/*"]},
    ])
    assert policy._rules.url_prefilter is None
    assert policy.decide(attrs.evolve(BASE, path="/y/1")).rule == "set"
    assert policy.decide(attrs.evolve(BASE, method="POST")).rule == "any"
