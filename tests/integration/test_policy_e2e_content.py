"""Content security (MIME types, extensions, sizes) and DLP detectors through the proxy."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

import harness
from harness import RawConnection, assert_blocked, assert_passed, build_request, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


MAX_UPLOAD = 10_000
MAX_DOWNLOAD = 100_000


@pytest.fixture(scope="module")
def content_node(module_node_factory, origins):
    policy = harness.make_policy(
        content_security={
            "blocked_mime_types": ["application/x-msdownload", "video/*"],
            "blocked_extensions": ["exe", "msi"],
            "max_upload_bytes": MAX_UPLOAD,
            "max_download_bytes": MAX_DOWNLOAD,
        },
        dlp={
            "scan_limit_bytes": 65536,
            "detectors": [
                {"name": "cards", "type": "card_number", "action": "block"},
                {"name": "secret-project", "type": "keyword", "patterns": ["project bluebird"], "action": "log"},
                {"name": "secret-query", "type": "regex", "patterns": ["secret=\\d{4}"], "action": "block"},
            ],
        },
    )
    return module_node_factory.start(policy=policy, name="content")


def respond_url(origins, **params) -> str:
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return origins.url(f"/respond?{query}")


@pytest.mark.parametrize("ctype", ["application/x-msdownload", "video/mp4", "VIDEO/webm; codecs=vp9"])
def test_blocked_mime_type(content_node, origins, ctype):
    response = proxy_request(content_node, "GET", respond_url(origins, ctype=ctype, size=500))
    assert response.status == 403
    assert "text/html" in (response.header("content-type") or "")
    assert b"z" * 500 not in response.body, "the blocked body reached the client"


def test_allowed_mime_type(content_node, origins):
    response = proxy_request(content_node, "GET", respond_url(origins, ctype="text/plain", body="fine"))
    assert response.status == 200 and response.body == b"fine"


def test_blocked_extension_in_the_url(content_node, origins):
    response = proxy_request(content_node, "GET", origins.url("/downloads/setup.exe"))
    assert response.status == 403
    assert "text/html" in (response.header("content-type") or "")
    assert_passed(proxy_request(content_node, "GET", origins.url("/downloads/readme.txt")))


def test_blocked_extension_in_content_disposition(content_node, origins):
    url = origins.url("/respond?h=" + quote('Content-Disposition: attachment; filename="tool.msi"', safe="")
                      + "&size=500")
    response = proxy_request(content_node, "GET", url)
    assert response.status == 403
    assert b"z" * 500 not in response.body, "the blocked body reached the client"


def test_download_with_content_length_over_the_limit_is_blocked(content_node, origins):
    response = proxy_request(content_node, "GET", respond_url(origins, size=MAX_DOWNLOAD * 2))
    assert response.status == 403
    assert len(response.body) < MAX_DOWNLOAD


def test_download_within_the_limit_passes(content_node, origins):
    response = proxy_request(content_node, "GET", respond_url(origins, size=MAX_DOWNLOAD // 2))
    assert response.status == 200 and len(response.body) == MAX_DOWNLOAD // 2


def test_chunked_download_growing_past_the_limit_is_cut_off(content_node, origins):
    total = MAX_DOWNLOAD * 3
    url = origins.url(f"/large?bytes={total}&chunked=1&cut=marker")
    with RawConnection(content_node.proxy) as conn:
        conn.send(build_request("GET", url))
        with pytest.raises(harness.IncompleteResponse) as cut:
            conn.read_response(timeout=15)
    assert cut.value.status == 200
    assert len(cut.value.body) < total
    record = content_node.wait_for_url("cut=marker")
    assert record.get("detail"), f"the cut-off is not explained in the access record: {record}"


def test_upload_over_the_limit_is_413(content_node, origins):
    response = proxy_request(content_node, "POST", origins.url("/upload/too-big"), body=b"u" * (MAX_UPLOAD + 1))
    assert response.status == 413


def test_upload_within_the_limit_passes(content_node, origins):
    assert assert_passed(proxy_request(content_node, "POST", origins.url("/upload/ok"),
                                       body=b"u" * MAX_UPLOAD))["body_len"] == MAX_UPLOAD


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559"])
def test_dlp_card_number_blocks(content_node, origins, card):
    response = proxy_request(content_node, "POST", origins.url("/dlp/card"),
                             body=f"order=1&card={card}&thanks".encode())
    assert_blocked(response, "cards")


def test_dlp_invalid_luhn_passes(content_node, origins):
    echo = assert_passed(proxy_request(content_node, "POST", origins.url("/dlp/not-a-card"),
                                       body=b"order=1&card=4111 1111 1111 1112"))
    assert echo["body_len"] > 0


def test_dlp_keyword_with_log_action_passes_and_is_recorded(content_node, origins):
    assert_passed(proxy_request(content_node, "POST", origins.url("/dlp/keyword"),
                                body=b"minutes of the Project Bluebird meeting"))
    record = content_node.wait_for_url("/dlp/keyword")
    assert "secret-project" in json.dumps(record.get("dlp")), record


def test_dlp_regex_in_query_string_blocks(content_node, origins):
    assert_blocked(proxy_request(content_node, "GET", origins.url("/search?secret=1234")), "secret-query")
    assert_passed(proxy_request(content_node, "GET", origins.url("/search?secret=12")))
