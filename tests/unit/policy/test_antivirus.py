"""The `antivirus` policy section: validation, defaults, compiled form."""

from __future__ import annotations

import pytest

from safesquid_tw.policy.antivirus import DEFAULTS, AntivirusRules
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.validate import validate_document

BASE = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}


def doc(**antivirus):
    return {**BASE, "antivirus": antivirus}


def test_defaults_leave_the_section_out_so_old_digests_stay():
    assert "antivirus" not in validate_document(BASE)
    assert "antivirus" not in validate_document(doc())
    assert AntivirusRules.from_section(None).enabled is False


def test_a_full_section_round_trips():
    section = validate_document(doc(enabled=True, icap_services=["icap://127.0.0.1:1344/avscan"],
                                    fail_mode="open", skip_mime_types=["Video/*", "application/x-iso9660-image"]))
    av = section["antivirus"]
    assert av == {**DEFAULTS, "enabled": True, "icap_services": ["icap://127.0.0.1:1344/avscan"],
                  "fail_mode": "open", "skip_mime_types": ["Video/*", "application/x-iso9660-image"]}
    rules = AntivirusRules.from_section(av)
    assert rules.downloads and rules.uploads and rules.fail_mode == "open"
    assert rules.skips(b"video/mp4; codecs=x") and rules.skips(b"Application/X-ISO9660-Image")
    assert not rules.skips(b"application/zip") and not rules.skips(None)


@pytest.mark.parametrize("section, path, words", [
    ({"enabled": True}, "antivirus.icap_services", "at least one"),
    ({"icap_services": ["http://scanner/avscan"]}, "antivirus.icap_services[0]", "icap://"),
    ({"icap_services": ["icap://scanner"]}, "antivirus.icap_services[0]", "service"),
    ({"icap_services": ["icap://a/x", "icap://a/x"]}, "antivirus.icap_services", "twice"),
    ({"fail_mode": "maybe"}, "antivirus.fail_mode", "closed"),
    ({"oversize_action": "scan"}, "antivirus.oversize_action", "allow"),
    ({"max_scan_bytes": 0}, "antivirus.max_scan_bytes", ""),
    ({"timeout_seconds": "5"}, "antivirus.timeout_seconds", ""),
    ({"self_test_seconds": 1}, "antivirus.self_test_seconds", ""),
    ({"skip_mime_types": ["video"]}, "antivirus.skip_mime_types[0]", "MIME"),
    ({"virus": True}, "antivirus.virus", "unknown key"),
])
def test_bad_fields_are_refused_at_their_path(section, path, words):
    with pytest.raises(PolicyError) as caught:
        validate_document(doc(**section))
    assert caught.value.path.startswith(path)
    assert words in str(caught.value)
