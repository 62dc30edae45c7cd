"""The sample policy (etc/policy.json) that a node started without --policy runs."""

from __future__ import annotations

import attrs
import pytest

from safesquid_tw.policy.codec import load_policy_file
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.model import DlpHit, Identity, RequestFacts
from safesquid_tw.resources import sample_policy_path


@pytest.fixture(scope="module")
def sample() -> Policy:
    return load_policy_file(str(sample_policy_path()))


def request(host: str, client: str = "127.0.0.1", **more: object) -> RequestFacts:
    return RequestFacts(client_ip=client, method="GET", scheme="http", host=host, port=80, path="/", **more)


def test_sample_validates(sample: Policy) -> None:
    assert sample.version == 1
    assert sample.document["format"] == "safesquid-policy/1"
    domains = sum(len(c["domains"]) for c in sample.document["categories"].values())
    assert domains >= 250
    assert len(sample.document["categories"]) >= 8


def test_blocked_example_shows_the_block_page(sample: Policy) -> None:
    decision = sample.compiled.decide(request("blocked.example"))
    assert (decision.action, decision.rule, decision.category) == ("deny", "sample-block", "sample-blocked")
    assert "blocked.example" in decision.reason


@pytest.mark.parametrize("client", ["127.0.0.1", "::1", "10.1.2.3", "172.20.0.5", "192.168.1.5", "fd12::1",
                                    "::ffff:192.168.1.5"])
def test_local_clients_browse_without_signing_in(sample: Policy, client: str) -> None:
    assert sample.compiled.auth_required(client) is False
    decision = sample.compiled.decide(request("example.com", client))
    assert (decision.action, decision.rule) == ("allow", "allow-local-networks")


@pytest.mark.parametrize("host, rule", [
    ("www.pornhub.com", "block-adult"),
    ("sports.bet365.com", "block-gambling"),
    ("testsafebrowsing.appspot.com", "block-malware"),
    ("www.itisatrap.org", "block-malware"),
])
def test_sample_categories_are_blocked(sample: Policy, host: str, rule: str) -> None:
    decision = sample.compiled.decide(request(host))
    assert (decision.action, decision.rule) == ("deny", rule)


def test_other_clients_must_sign_in_and_staff_may_browse(sample: Policy) -> None:
    compiled = sample.compiled
    assert compiled.auth_required("203.0.113.7") is True
    assert compiled.decide(request("example.com", "203.0.113.7")).action == "deny"
    identity = compiled.verify_credentials("demo", "demo-password")
    assert identity == Identity("demo", frozenset({"staff"}))
    signed_in = request("example.com", "203.0.113.7", user=identity.user, groups=identity.groups)
    assert (compiled.decide(signed_in).action, compiled.decide(signed_in).rule) == ("allow", "allow-staff")
    assert compiled.verify_credentials("demo", "wrong") is None


def test_most_specific_category_wins(sample: Policy) -> None:
    compiled = sample.compiled
    assert compiled.category_of("www.google.com") == "search"
    assert compiled.category_of("mail.google.com") == "webmail"
    assert compiled.category_of("news.google.com") == "news"
    assert compiled.category_of("drive.google.com") == "file-sharing"


def test_sample_applications(sample: Policy) -> None:
    compiled = sample.compiled
    app = request("www.facebook.com", headers={"user-agent": "Mozilla/5.0 [FBAN/FBIOS;FBAV/400]"})
    assert compiled.application_of(app) == "facebook-app"
    assert compiled.application_of(attrs.evolve(app, headers={})) == "facebook"
    assert compiled.application_of(request("www.youtube.com")) == "youtube"
    upload = attrs.evolve(request("content.dropboxapi.com"), method="POST")
    decision = compiled.decide(upload)
    assert (decision.rule, decision.application) == ("block-dropbox-uploads", "dropbox")


def test_sample_content_security_and_dlp(sample: Policy) -> None:
    compiled = sample.compiled
    assert compiled.content.blocked_request("/downloads/setup.exe") is not None
    assert compiled.content.blocked_response(b"application/x-msdownload", None, "/d") is not None
    assert compiled.content.blocked_request("/report.pdf") is None
    assert compiled.dlp.scan(b"cc=4111 1111 1111 1111") == [DlpHit("payment-cards", "block")]
    assert compiled.dlp.scan(b"Company Confidential draft") == [DlpHit("confidential-marker", "log")]
    assert compiled.connect_ports == frozenset({443})


def test_comment_tells_the_demo_password(sample: Policy) -> None:
    comment = sample.document["comment"]
    assert "demo" in comment and "demo-password" in comment and "blocked.example" in comment
