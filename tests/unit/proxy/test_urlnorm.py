"""Rules match what the origin will see: the normal form of a request's path, and a table of
spellings that used to walk around each rule kind, all of them blocked."""

from __future__ import annotations

from typing import Any

import pytest

from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.compiled import CompiledPolicy
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.proxy.http1 import ProtocolError
from safesquid_tw.proxy.target import parse_target
from safesquid_tw.proxy.urlnorm import blocked_request_any, normalise_path, remove_dot_segments, strictest_decision


@pytest.mark.parametrize("raw, forward, decision, others", [
    # nothing to do: the common case keeps the very same string
    ("/a/b.html?x=1", "/a/b.html?x=1", "/a/b.html?x=1", ()),
    # unreserved escapes decoded, other escapes in upper-case hex; forwarded as sent
    ("/%73ecret/%7euser", "/%73ecret/%7euser", "/secret/~user", ()),
    ("/a%2fb", "/a%2fb", "/a%2Fb", ("/a/b",)),
    ("/q?x=%7e%2f&y=%41", "/q?x=%7e%2f&y=%41", "/q?x=~%2F&y=A", ()),
    ("/bad%zz%", "/bad%zz%", "/bad%zz%", ()),
    # dot-segments: removed, and the origin gets the path without them too
    ("/a/../secret/x", "/secret/x", "/secret/x", ()),
    ("/a/./b/../../c/", "/c/", "/c/", ()),
    ("/a/%2e%2E/secret", "/secret", "/secret", ()),
    ("/..", "/", "/", ()),
    ("/a/..?q=/../x", "/?q=/../x", "/?q=/../x", ()),
    # readings some origins make: merged slashes, backslash, Tomcat's "..;"
    ("//secret//x", "//secret//x", "/secret/x", ("//secret//x",)),
    ("/a\\..\\secret", "/a\\..\\secret", "/secret", ("/a\\..\\secret",)),
    ("/a/..;/secret", "/a/..;/secret", "/secret", ("/a/..;/secret",)),
    ("/secret/..%2F..%2Fpublic/x", "/secret/..%2F..%2Fpublic/x", "/secret/..%2F..%2Fpublic/x", ("/public/x",)),
])
def test_normal_form(raw, forward, decision, others):
    normal = normalise_path(raw)
    assert (normal.forward, normal.decision, normal.others) == (forward, decision, others)
    # idempotent: the forwarded form normalises to the same decision
    assert normalise_path(normal.decision).decision == normal.decision


@pytest.mark.parametrize("path, expected", [
    ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 5.2.4's own example
    ("/mid/content=5/../6", "/mid/6"),
    ("/a/b/.", "/a/b/"),
    ("/../../x", "/x"),
])
def test_remove_dot_segments(path, expected):
    assert remove_dot_segments(path) == expected


# -- the bypass table ------------------------------------------------------------------------

def _policy(default: str = "allow", rules: list[dict[str, Any]] | None = None) -> CompiledPolicy:
    doc: dict[str, Any] = {
        "format": "safesquid-policy/1",
        "access": {"default_action": default, "rules": rules if rules is not None else [
            {"name": "no-secret", "action": "deny", "url_patterns": ["http://www.example.com/secret/*"]},
            {"name": "no-admin-app", "action": "deny", "applications": ["admin"]},
            {"name": "no-social", "action": "deny", "categories": ["social"]},
        ]},
        "categories": {"social": {"domains": ["social.example", "xn--bcher-kva.example"]}},
        "applications": [{"name": "admin", "hosts": ["app.example"], "paths": ["/admin/*"]}],
        "content_security": {
            "blocked_mime_types": [], "blocked_extensions": ["exe"],
            "max_upload_bytes": None, "max_download_bytes": None,
        },
    }
    return policy_from_document(doc, 1).compiled


DENY_BY_DEFAULT = [{"name": "public-only", "action": "allow", "url_patterns": ["http://www.example.com/public/*"]}]


def verdict(policy: CompiledPolicy, url: bytes) -> str:
    """What the proxy decides for GET url: "400", "allow", the denying rule, or "extension"."""
    try:
        target = parse_target(b"GET", url)
    except ProtocolError as e:
        return str(e.status)
    facts = RequestFacts(client_ip="192.0.2.10", method="GET", scheme=target.scheme, host=target.host,
                         port=target.port, path=target.match_path)
    decision = policy.decide(facts)
    if target.other_paths and decision.action == "allow":
        decision = strictest_decision(policy, facts, target.other_paths, decision)
    if decision.action != "allow":
        return decision.rule or "default"
    if blocked_request_any(policy.content, target):
        return "extension"
    return "allow"


BYPASSES = {
    "no-secret": [  # url_patterns
        b"http://www.example.com/%73ecret/x", b"http://www.example.com/%73%65%63%72%65%74/x",
        b"http://www.example.com/a/../secret/x", b"http://www.example.com/a/%2e%2e/secret/x",
        b"http://www.example.com/./secret/x", b"http://www.example.com//secret/x",
        b"http://www.example.com/secret%2Fx", b"http://www.example.com/secret%2fx",
        b"http://www.example.com/a/..;/secret/x", b"http://www.example.com/a\\..\\secret/x",
        b"http://www.example.com/secret\\x", b"http://WWW.EXAMPLE.COM./secret/x",
        b"http://www.example.com:80/secret/x", b"HTTP://www.example.com/secret/x",
    ],
    "extension": [  # blocked_extensions
        b"http://dl.example/a.exe", b"http://dl.example/a.EXE", b"http://dl.example/a.%65xe",
        b"http://dl.example/a.exe%3f", b"http://dl.example/a.exe%3F.txt", b"http://dl.example/a.exe%00.txt",
        b"http://dl.example/a.exe;jsessionid=1", b"http://dl.example/a.exe.", b"http://dl.example/a.exe%20",
        b"http://dl.example/a.exe?x=1", b"http://dl.example/x/..%2Fa.exe", b"http://dl.example/a.ex%65",
        b"http://dl.example/x%2Fa.exe", b"http://dl.example/a.exe%3B.txt", b"http://dl.example/a%2Eexe",
    ],
    "no-admin-app": [  # application signatures by path
        b"http://app.example/%61dmin/x", b"http://app.example/x/../admin/x", b"http://app.example//admin/x",
        b"http://APP.example./admin/x", b"http://app.example/admin%2Fx", b"http://app.example/x/..;/admin/x",
    ],
    "no-social": [  # categories by host
        b"http://SOCIAL.example/", b"http://social.example./", b"http://social.example:80/",
        b"http://Social.Example.:80/x", b"http://xn--bcher-kva.example/", b"http://XN--BCHER-KVA.example./",
    ],
    "400": [  # spellings another parser could read as another host: refused outright
        b"http://user:pw@social.example/", b"http://social%2eexample/", b"http://b\xc3\xbccher.example/",
        b"http://social.example\\@x.example/", b"http://dl.example/a.exe#frag",
    ],
}


@pytest.mark.parametrize("expected, url", [(k, u) for k, urls in BYPASSES.items() for u in urls])
def test_bypass_spellings_are_blocked(expected, url):
    assert verdict(_policy(), url) == expected


@pytest.mark.parametrize("url", [
    b"http://www.example.com/public/../secret/x", b"http://www.example.com/public/..%2Fsecret/x",
    b"http://www.example.com/public/..;/secret/x", b"http://www.example.com/public/..\\secret/x",
    b"http://www.example.com/public//../secret/x", b"http://www.example.com/%70ublic/../secret",
])
def test_allow_list_cannot_be_left_by_spelling(url):
    assert verdict(_policy("deny", DENY_BY_DEFAULT), url) == "default"


@pytest.mark.parametrize("url", [
    b"http://www.example.com/public/x", b"http://www.example.com/%70ublic/x",
    b"http://www.example.com/public/a%2Fb", b"http://www.example.com/public//x",
])
def test_allow_list_still_allows_its_own_paths(url):
    assert verdict(_policy("deny", DENY_BY_DEFAULT), url) == "allow"


@pytest.mark.parametrize("url", [
    b"http://www.example.com/secrets", b"http://www.example.com/public/secret/x",
    b"http://www.example.com/search?q=../secret/x", b"http://dl.example/a.exe.txt",
    b"http://dl.example/setup?file=a.exe", b"http://app.example/administrator",
    b"http://www.example.com/a%2Fb/secret%2Ex",
])
def test_look_alikes_are_not_blocked(url):
    assert verdict(_policy(), url) == "allow"


def test_patterns_are_matched_with_normal_escapes():
    policy = _policy(rules=[{"name": "tilde", "action": "deny", "url_patterns": ["http://h.example/%7Euser/*"]}])
    assert verdict(policy, b"http://h.example/~user/x") == "tilde"
    assert verdict(policy, b"http://h.example/%7euser/x") == "tilde"
