"""The tls_inspection policy section: validation, defaults, and the bump-or-splice decision."""

from __future__ import annotations

import pytest

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.tlsinspection import DEFAULTS, TlsInspectionRules
from safesquid_tw.policy.validate import validate_document


def doc(**tls):
    document = {
        "format": "safesquid-policy/1",
        "access": {"default_action": "allow"},
        "categories": {"banking": {"domains": ["*.bank.example"]}},
    }
    if tls is not None:
        document["tls_inspection"] = tls
    return document


def test_defaults_leave_the_document_as_it_was():
    canonical = validate_document(doc())
    assert "tls_inspection" not in canonical  # digests of older documents stay valid
    assert TlsInspectionRules(None).inspect("a.example", (), "10.0.0.1") == (False, "TLS inspection is off")


def test_full_section_round_trips():
    section = {"enabled": True, "bypass_domains": ["*.health.example", "pay.example"],
               "bypass_categories": ["banking"], "bypass_clients": ["10.9.0.0/16"],
               "allow_invalid_upstream_domains": ["legacy.example"], "auto_bypass_pinned": 3}
    assert validate_document(doc(**section))["tls_inspection"] == section


@pytest.mark.parametrize("section, path, words", [
    ({"enabled": "yes"}, "tls_inspection.enabled", "true or false"),
    ({"bypass_categories": ["gambling"]}, "tls_inspection.bypass_categories[0]", "not defined"),
    ({"bypass_clients": ["10.0.0.1/8"]}, "tls_inspection.bypass_clients[0]", "not an IP address"),
    ({"bypass_domains": ["a.example", "A.example"]}, "tls_inspection.bypass_domains[1]", "twice"),
    ({"allow_invalid_upstream_domains": ["*x"]}, "tls_inspection.allow_invalid_upstream_domains[0]", "domain"),
    ({"bump": True}, "tls_inspection.bump", "unknown key"),
])
def test_bad_sections_are_refused_at_the_field(section, path, words):
    with pytest.raises(PolicyError) as info:
        validate_document(doc(**section))
    assert info.value.path == path and words in info.value.message


@pytest.fixture
def rules():
    return TlsInspectionRules({
        "enabled": True, "bypass_domains": ["*.health.example", "pay.example"], "bypass_categories": ["banking"],
        "bypass_clients": ["10.9.0.0/16"], "allow_invalid_upstream_domains": ["*.legacy.example"],
    })


@pytest.mark.parametrize("host, categories, client, expected", [
    ("www.example.com", (), "10.0.0.1", (True, None)),
    ("health.example", (), "10.0.0.1", (False, "bypassed domain")),
    ("a.b.health.example", (), "10.0.0.1", (False, "bypassed domain")),
    ("pay.example", (), "10.0.0.1", (False, "bypassed domain")),
    ("www.pay.example", (), "10.0.0.1", (True, None)),
    ("online.bank.example", ("banking",), "10.0.0.1", (False, "bypassed category banking")),
    ("www.example.com", (), "10.9.3.4", (False, "bypassed client")),
    ("PAY.EXAMPLE.", (), "10.0.0.1", (False, "bypassed domain")),
])
def test_bump_or_splice(rules, host, categories, client, expected):
    assert rules.inspect(host, categories, client) == expected


def test_invalid_certificates_tolerated_only_where_listed(rules):
    assert rules.allows_invalid_certificate("old.legacy.example")
    assert rules.allows_invalid_certificate("legacy.example")
    assert not rules.allows_invalid_certificate("example.com")


def test_auto_bypass_after_repeated_rejections():
    from safesquid_tw.proxy.intercept.pinned import AUTO_BYPASS_FOR, AUTO_WINDOW, PinnedClients

    now = [1000.0]
    pinned = PinnedClients(clock=lambda: now[0])
    assert not pinned.auto_bypassed("app.example", 3)
    for _ in range(2):
        pinned.rejected("app.example", "10.0.0.1", "alert bad certificate")
    assert not pinned.auto_bypassed("app.example", 3)
    now[0] += AUTO_WINDOW + 1  # old rejections no longer count
    pinned.rejected("app.example", "10.0.0.1", "alert bad certificate")
    assert not pinned.auto_bypassed("app.example", 3)
    pinned.rejected("app.example", "10.0.0.2", "alert unknown ca")
    pinned.rejected("app.example", "10.0.0.3", "alert unknown ca")
    assert pinned.auto_bypassed("app.example", 3)
    assert not pinned.auto_bypassed("app.example", 0)
    now[0] += AUTO_BYPASS_FOR - 1
    assert pinned.auto_bypassed("app.example", 3)
    now[0] += 2
    assert not pinned.auto_bypassed("app.example", 3)
    assert pinned.top()[0].rejections == 5 and "recent" not in pinned.top()[0].to_json()


def test_no_ca_means_tunnels_are_refused_not_carried_blind():
    from safesquid_tw.proxy.intercept.session import Interceptor

    class Conn:
        answered = None

        def _respond_error(self, ctx, status, detail, error_type):
            self.answered = (status, error_type)

    class Leaves:
        ca = None

    class Ctx:
        tls = None

        class policy:
            class compiled:
                tls_inspection = TlsInspectionRules({**DEFAULTS, "enabled": True})

    conn = Conn()
    assert Interceptor(None, Leaves(), None).take(conn, Ctx(), None) is True
    assert conn.answered == (503, "destination_unavailable")
