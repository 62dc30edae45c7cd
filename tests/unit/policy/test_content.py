"""Content security (file types, sizes) and DLP detectors."""

from __future__ import annotations

from typing import Any

import pytest

from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.content import ContentRules
from safesquid_tw.policy.dlp import DlpRules, contains_card_number, luhn_valid
from safesquid_tw.policy.model import DlpHit


def sections(**overrides: Any) -> Any:
    doc = {"format": "safesquid-policy/1", "access": {"default_action": "allow"}, **overrides}
    return policy_from_document(doc, 1).compiled


CONTENT = sections(content_security={
    "blocked_mime_types": ["application/x-msdownload", "video/*"],
    "blocked_extensions": ["exe", "MSI"],
    "max_upload_bytes": 1000,
    "max_download_bytes": None,
}).content


@pytest.mark.parametrize("path, blocked", [
    ("/setup.exe", True),
    ("/dir/setup.EXE?download=1", True),
    ("/installer.msi", True),
    ("/setup.exe.txt", False),
    ("/dir.exe/readme", False),
    ("/setup.exe/", False),
    ("/a%2Eexe", True),
    ("/file.exe;jsessionid=1", True),
    ("/trailing.exe.", True),
    ("/page?file=setup.exe", False),
    ("/noextension", False),
    ("", False),
])
def test_blocked_request_by_extension(path: str, blocked: bool) -> None:
    reason = CONTENT.blocked_request(path)
    assert (reason is not None) is blocked
    if blocked:
        assert reason.startswith("files of type .") and reason.endswith(" are blocked")


@pytest.mark.parametrize("content_type, disposition, path, expected", [
    (b"application/x-msdownload", None, "/x", "content of type application/x-msdownload is blocked"),
    (b"Application/X-MSDownload; charset=binary", None, "/x", "content of type application/x-msdownload is blocked"),
    (b"video/mp4", None, "/x", "content of type video/mp4 is blocked"),
    (b"text/html; charset=utf-8", None, "/x", None),
    (b"videos/mp4", None, "/x", None),
    (None, None, "/x", None),
    (b"application/octet-stream", b'attachment; filename="report.exe"', "/download?id=3", "files of type .exe are blocked"),
    (b"application/octet-stream", b"attachment; filename=report.exe", "/download", "files of type .exe are blocked"),
    (b"application/octet-stream", b"attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.msi", "/d", "files of type .msi are blocked"),
    (b"application/octet-stream", b'attachment; filename="notes.txt"', "/d", None),
    (b"application/octet-stream", None, "/files/tool.exe", "files of type .exe are blocked"),
])
def test_blocked_response(content_type: bytes | None, disposition: bytes | None, path: str, expected: str | None) -> None:
    assert CONTENT.blocked_response(content_type, disposition, path) == expected


def test_size_limits() -> None:
    assert (CONTENT.max_upload, CONTENT.max_download) == (1000, None)


def test_empty_section_blocks_nothing() -> None:
    content = sections().content
    assert isinstance(content, ContentRules)
    assert content.blocked_request("/setup.exe") is None
    assert content.blocked_response(b"application/x-msdownload", b"attachment; filename=a.exe", "/a.exe") is None
    assert (content.max_upload, content.max_download) == (None, None)


# -- DLP ---------------------------------------------------------------------------------------

DLP = sections(dlp={"scan_limit_bytes": 200, "detectors": [
    {"name": "secret-project", "type": "keyword", "patterns": ["project bluebird", "Ünïcode Wörd"], "action": "block"},
    {"name": "ssn", "type": "regex", "patterns": [r"\b\d{3}-\d{2}-\d{4}\b", r"(?i)^ssn:"], "action": "log"},
    {"name": "cards", "type": "card_number", "action": "block"},
]}).dlp

SECRET, SSN, CARDS = DlpHit("secret-project", "block"), DlpHit("ssn", "log"), DlpHit("cards", "block")


@pytest.mark.parametrize("text, hits", [
    (b"nothing to see", []),
    (b"card 4111 1111 1111 1111 ok", [CARDS]),
    (b"card=4111-1111-1111-1111", [CARDS]),
    (b"card=4111111111111111&x=1", [CARDS]),
    (b"amex 3782 822463 10005", [CARDS]),
    (b"card 4111 1111 1111 1112", []),
    (b"short 411111111111", []),
    (b"long 41111111111111111111111", []),
    (b"q=4111+1111+1111+1111", [CARDS]),
    (b"q=4111%201111%201111%201111", [CARDS]),
    (b"order 12 4111 1111 1111 1111", [CARDS]),
    (b"about PROJECT BlueBird today", [SECRET]),
    (b"about project+bluebird", [SECRET]),
    (b"about project%20bluebird", [SECRET]),
    (b"about projectbluebird", []),
    ("\u00fcn\u00efcode w\u00f6rd".encode(), [SECRET]),
    (b"ssn 123-45-6789", [SSN]),
    (b"SSN: none", [SSN]),
    (b"ssn 123456789", []),
    (b"project bluebird 123-45-6789 5500 0000 0000 0004", [SECRET, SSN, CARDS]),
    (b"\xff\xfe invalid utf-8 project bluebird", [SECRET]),
    (b"", []),
])
def test_dlp_scan(text: bytes, hits: list[DlpHit]) -> None:
    assert DLP.scan(text) == hits


def test_dlp_scans_only_up_to_the_limit() -> None:
    card = b"4111111111111111"
    assert DLP.scan(b"x" * (200 - len(card)) + card) == [CARDS]
    assert DLP.scan(b"x" * (201 - len(card)) + card) == []
    assert DLP.scan_limit == 200


def test_dlp_without_detectors() -> None:
    dlp = sections().dlp
    assert isinstance(dlp, DlpRules)
    assert (dlp.scans_bodies, dlp.scan_limit) == (False, 1048576)
    assert dlp.scan(b"4111111111111111 project bluebird") == []
    assert DLP.scans_bodies is True


@pytest.mark.parametrize("digits, valid", [
    ("4111111111111111", True),
    ("4111111111111112", False),
    ("378282246310005", True),
    ("6011111111111117", True),
    ("79927398713", True),
    ("79927398710", False),
])
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


def test_card_search_stays_bounded_on_digit_floods() -> None:
    # A body of nothing but digit groups is searched with a bounded amount of work.
    assert contains_card_number("1234 " * 100000) is False
    assert contains_card_number("12 " * 100000 + "4111 1111 1111 1111") is True
