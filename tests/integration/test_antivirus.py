"""Anti-virus over ICAP through the real proxy, with a real c-icap and ClamAV (clamd)."""

from __future__ import annotations

import hashlib

import pytest

import harness
from av_origin import AvOrigin, clean_bytes
from harness import RawConnection, build_request, proxy_request
from icap_servers import CIcap, EICAR, THREAT_NAME, ModifyingServer, Scanners, SilentServer, missing_tools

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_missing = missing_tools()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

PREVIEW = 1024  # c-icap's virus_scan service advertises this Preview size


def av_policy(*services: str, **settings) -> dict:
    return harness.make_policy(antivirus={"enabled": True, "icap_services": list(services), **settings})


@pytest.fixture(scope="module")
def scanners(tmp_path_factory):
    servers = Scanners(tmp_path_factory.mktemp("scanners")).start()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def origin():
    server = AvOrigin()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def av_node(module_node_factory, scanners):
    node = module_node_factory.start(policy=av_policy(scanners.url), name="av")
    wait_scanner_state(node, "ok")
    return node


def wait_scanner_state(node, state: str, timeout: float = 20.0) -> dict:
    def check():
        _status, health = node.health()
        services = ((health or {}).get("antivirus") or {}).get("services") or []
        return health if services and all(s["state"] == state for s in services) else None

    return harness.wait_until(check, timeout, f"the node's ICAP services to be {state}")


def get(node, url: str, **kw):
    return proxy_request(node, "GET", url, **kw)


def record_for(node, fragment: str) -> dict:
    return node.wait_for_url(fragment)


# -- downloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_eicar_download_is_blocked_with_its_name(av_node, origin, framing):
    path = f"/eicar-{framing}?kind=eicar&framing={framing}"
    response = get(av_node, origin.url(path))
    assert response.status == 403
    assert THREAT_NAME in response.text
    assert EICAR not in response.body
    record = record_for(av_node, f"/eicar-{framing}")
    assert record["action"] == "deny" and record["rule"] == "antivirus"
    assert THREAT_NAME in record["detail"]


def test_eicar_split_across_http_chunks_is_found(av_node, origin):
    # Chunks of 7 bytes: no single chunk holds the signature; the scanner sees the decoded body.
    response = get(av_node, origin.url("/eicar-split?kind=eicar-padded&size=5000&framing=chunked&split=7"))
    assert response.status == 403 and THREAT_NAME in response.text


@pytest.mark.parametrize("size", [PREVIEW - 1, PREVIEW, PREVIEW + 1, 300_000])
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_clean_download_passes_byte_for_byte(av_node, origin, size, framing):
    seed = f"dl-{size}-{framing}"
    response = get(av_node, origin.url(f"/clean-{seed}?size={size}&framing={framing}&seed={seed}"))
    assert response.status == 200
    assert response.body == clean_bytes(size, seed)
    record = record_for(av_node, f"/clean-{seed}")
    assert record["action"] == "allow" and record["detail"] is None


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_eicar_beyond_the_preview_is_found(av_node, origin, framing):
    # Only the part sent after the scanner's 100 Continue holds the virus.
    response = get(av_node, origin.url(f"/eicar-late-{framing}?kind=eicar-late&size={PREVIEW * 4}&framing={framing}"))
    assert response.status == 403 and THREAT_NAME in response.text


def test_keep_alive_after_a_held_download(av_node, origin):
    with RawConnection(av_node.proxy, 15) as conn:
        for i in range(3):
            conn.send(build_request("GET", origin.url(f"/ka-{i}?size=2000&seed=ka{i}")))
            response = conn.read_response(timeout=15)
            assert response.status == 200 and response.body == clean_bytes(2000, f"ka{i}")


def test_clean_verdicts_are_cached_by_content(node_factory, scanners, origin):
    # One process: the clean-verdict cache is per worker, and the second request could be served
    # by another worker than the first (docs/ARCHITECTURE.md, Workers).
    av_node = node_factory.start(policy=av_policy(scanners.url), args=["--workers", "1"], name="avcache")
    wait_scanner_state(av_node, "ok")
    url = origin.url("/cached-{}?size=50000&seed=popular")
    assert get(av_node, url.format(1)).status == 200
    before = av_node.health()[1]["antivirus"]
    response = get(av_node, url.format(2))
    assert response.status == 200 and response.body == clean_bytes(50000, "popular")
    after = av_node.health()[1]["antivirus"]
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert after["scans"] == before["scans"]


def test_health_shows_the_scanner(av_node, scanners, origin):
    assert get(av_node, origin.url("/health-eicar?kind=eicar")).status == 403
    _status, health = av_node.health()
    antivirus = health["antivirus"]
    assert antivirus["enabled"] is True and antivirus["fail_mode"] == "closed"
    (service,) = antivirus["services"]
    assert service["url"] == scanners.url and service["state"] == "ok" and service["reachable"] is True
    assert service["istag"]
    assert service["detections"] >= 1  # self-tests are not counted


# -- uploads -----------------------------------------------------------------------------------


def test_eicar_upload_never_reaches_the_origin(av_node, origin):
    response = proxy_request(av_node, "POST", origin.url("/upload-eicar"), body=b"prefix\n" + EICAR + b"\nsuffix",
                             headers=[("Content-Type", "application/octet-stream")])
    assert response.status == 403 and THREAT_NAME in response.text
    assert not [s for s in origin.seen if s[1] == "/upload-eicar"], "the infected upload reached the origin"
    record = record_for(av_node, "/upload-eicar")
    assert record["action"] == "deny" and record["rule"] == "antivirus" and THREAT_NAME in record["detail"]


def test_chunked_eicar_upload_never_reaches_the_origin(av_node, origin):
    body = b"".join(b"%x\r\n%s\r\n" % (len(EICAR[i:i + 5]), EICAR[i:i + 5]) for i in range(0, len(EICAR), 5))
    data = build_request("POST", origin.url("/upload-chunked-eicar"),
                         [("Transfer-Encoding", "chunked"), ("Expect", "100-continue")], None)
    with RawConnection(av_node.proxy, 15) as conn:
        conn.send(data)
        interim = conn.read_response(timeout=15, skip_interim=False)
        assert interim.status == 100  # the proxy asks for the body itself: it holds it for the scan
        conn.send(body + b"0\r\n\r\n")
        response = conn.read_response(timeout=15)
    assert response.status == 403
    assert not [s for s in origin.seen if s[1] == "/upload-chunked-eicar"]


@pytest.mark.parametrize("size", [10, PREVIEW, 200_000])
def test_clean_upload_reaches_the_origin_intact(av_node, origin, size):
    body = clean_bytes(size, f"up{size}")
    response = proxy_request(av_node, "POST", origin.url(f"/upload-clean-{size}"), body=body)
    assert response.status == 200
    assert response.body == b"stored %d %s" % (size, hashlib.sha256(body).hexdigest().encode())


# -- scanner trouble and limits ----------------------------------------------------------------


def test_scanner_down_fail_closed_and_open(node_factory, origin):
    closed_url = f"icap://127.0.0.1:{harness.closed_port()}/avscan"
    closed = node_factory.start(policy=av_policy(closed_url), name="down-closed")
    wait_scanner_state(closed, "down")
    response = get(closed, origin.url("/down-closed?size=100"))
    assert response.status == 503 and "scanning is unavailable" in response.text
    record = record_for(closed, "/down-closed")
    assert record["rule"] == "antivirus" and "unavailable" in record["detail"]
    upload = proxy_request(closed, "POST", origin.url("/down-closed-upload"), body=b"data")
    assert upload.status == 503
    assert not [s for s in origin.seen if s[1] == "/down-closed-upload"]

    opened = node_factory.start(policy=av_policy(closed_url, fail_mode="open"), name="down-open")
    wait_scanner_state(opened, "down")
    response = get(opened, origin.url("/down-open?size=100&seed=o"))
    assert response.status == 200 and response.body == clean_bytes(100, "o")
    assert "not scanned" in record_for(opened, "/down-open")["detail"]


def test_slow_scanner_times_out_under_both_fail_modes(node_factory, origin):
    silent = SilentServer()
    try:
        closed = node_factory.start(policy=av_policy(silent.url, timeout_seconds=1), name="slow-closed")
        response = get(closed, origin.url("/slow-closed?size=100"))
        assert response.status == 503
        opened = node_factory.start(policy=av_policy(silent.url, timeout_seconds=1, fail_mode="open"),
                                    name="slow-open")
        response = get(opened, origin.url("/slow-open?size=100&seed=s"))
        assert response.status == 200 and response.body == clean_bytes(100, "s")
    finally:
        silent.close()


def test_failover_to_the_next_service(node_factory, origin, scanners):
    dead = f"icap://127.0.0.1:{harness.closed_port()}/avscan"
    node = node_factory.start(policy=av_policy(dead, scanners.url), name="failover")
    response = get(node, origin.url("/failover?kind=eicar"))
    assert response.status == 403 and THREAT_NAME in response.text
    assert get(node, origin.url("/failover-clean?size=10&seed=f")).body == clean_bytes(10, "f")


def test_oversize_objects(node_factory, origin):
    limit = 5000
    allow = node_factory.start(policy=av_policy(f"icap://127.0.0.1:{harness.closed_port()}/x",
                                                max_scan_bytes=limit, fail_mode="closed"), name="big-allow")
    for framing in ("length", "chunked"):
        response = get(allow, origin.url(f"/big-{framing}?size={limit * 4}&framing={framing}&seed=b"))
        assert response.status == 200 and response.body == clean_bytes(limit * 4, "b")
        assert "not scanned" in record_for(allow, f"/big-{framing}")["detail"]
    uploads = node_factory.start(policy=av_policy(f"icap://127.0.0.1:{harness.closed_port()}/x",
                                                  max_scan_bytes=limit, scan_downloads=False), name="big-up")
    big = clean_bytes(limit * 40, "big-upload")
    expected = b"stored %d %s" % (len(big), hashlib.sha256(big).hexdigest().encode())
    upload = proxy_request(uploads, "POST", origin.url("/big-upload-length"), body=big)
    assert upload.status == 200 and upload.body == expected
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 3000]), big[i:i + 3000]) for i in range(0, len(big), 3000))
    upload = proxy_request(uploads, "POST", origin.url("/big-upload-chunked"), body=chunked + b"0\r\n\r\n",
                           headers=[("Transfer-Encoding", "chunked")])
    assert upload.status == 200 and upload.body == expected  # held part first, then the rest, in order
    assert "not scanned" in record_for(uploads, "/big-upload-chunked")["detail"]
    block = node_factory.start(policy=av_policy(f"icap://127.0.0.1:{harness.closed_port()}/x",
                                                max_scan_bytes=limit, oversize_action="block"), name="big-block")
    for framing in ("length", "chunked"):
        response = get(block, origin.url(f"/bigb-{framing}?size={limit * 4}&framing={framing}"))
        assert response.status == 403 and "antivirus" in response.text
    upload = proxy_request(block, "POST", origin.url("/bigb-upload"), body=b"u" * (limit + 1))
    assert upload.status == 403
    assert not [s for s in origin.seen if s[1] == "/bigb-upload"]
    # Chunked: the limit is passed in the middle of a batch of small chunks.
    chunks = b"".join(b"40\r\n" + b"c" * 64 + b"\r\n" for _ in range(limit // 64 + 20)) + b"0\r\n\r\n"
    upload = proxy_request(block, "POST", origin.url("/bigb-upload-chunked"), body=chunks,
                           headers=[("Transfer-Encoding", "chunked")])
    assert upload.status == 403 and "antivirus" in upload.text
    assert not [s for s in origin.seen if s[1] == "/bigb-upload-chunked"]
    assert get(block, origin.url("/bigb-after?size=10")).status in (200, 503)  # the node still answers


def test_skip_mime_types(node_factory, origin):
    node = node_factory.start(policy=av_policy(f"icap://127.0.0.1:{harness.closed_port()}/x",
                                               skip_mime_types=["video/*"]), name="skip")
    response = get(node, origin.url("/skip?size=100&ctype=video/mp4&seed=v"))
    assert response.status == 200 and response.body == clean_bytes(100, "v")
    assert get(node, origin.url("/noskip?size=100")).status == 503


def test_a_scanner_that_lets_eicar_through_is_broken(node_factory, origin, tmp_path):
    # c-icap whose clamd is not there answers 204 to everything while OPTIONS looks healthy.
    icap = CIcap(tmp_path / "broken-icap", tmp_path / "no-clamd.sock").start()
    try:
        node = node_factory.start(policy=av_policy(icap.url), name="broken")
        health = wait_scanner_state(node, "broken")
        assert "EICAR" in health["antivirus"]["services"][0]["last_error"]
        assert get(node, origin.url("/broken?size=100")).status == 503
    finally:
        icap.stop()


def test_scanning_disabled_changes_nothing(module_node_factory, origin):
    node = module_node_factory.start(policy=harness.make_policy(), name="noav")
    response = get(node, origin.url("/noav?kind=eicar"))
    assert response.status == 200 and response.body == EICAR
    assert "antivirus" not in node.health()[1]


def test_a_modified_message_from_the_scanner_replaces_the_original(node_factory, origin):
    # The 200 path other than a block: the scanner's message goes on, re-framed by the proxy.
    service = ModifyingServer()
    try:
        node = node_factory.start(policy=av_policy(service.url), name="modify")
        wait_scanner_state(node, "ok")
        response = get(node, origin.url("/modify-dl?kind=modify&framing=chunked"))
        assert response.status == 200
        assert response.header("x-modified-by") == "modify-service"
        assert response.body == b"PLEASE MODIFY-ME" and response.header("content-length") == "16"
        assert "modified" in record_for(node, "/modify-dl")["detail"]
        upload = proxy_request(node, "POST", origin.url("/modify-up"), body=b"upload modify-me please")
        assert upload.status == 200
        (seen,) = [s for s in origin.seen if s[1] == "/modify-up"]
        assert seen[2] == b"UPLOAD MODIFY-ME PLEASE"
        plain = get(node, origin.url("/modify-plain?size=100&seed=m"))  # 204 from the same service
        assert plain.status == 200 and plain.body == clean_bytes(100, "m")
    finally:
        service.close()


def test_a_scanner_that_comes_back_is_tested_and_used_again(node_factory, origin, tmp_path):
    scanners = Scanners(tmp_path / "again").start()
    try:
        node = node_factory.start(policy=av_policy(scanners.url), name="again")
        wait_scanner_state(node, "ok")
        scanners.icap.stop()
        assert get(node, origin.url("/again-down?size=10")).status == 503
        wait_scanner_state(node, "down")
        scanners.icap.start()  # same port
        wait_scanner_state(node, "ok")  # the EICAR self-test passed again
        assert get(node, origin.url("/again-eicar?kind=eicar")).status == 403
        assert get(node, origin.url("/again-up?size=10&seed=a")).body == clean_bytes(10, "a")
    finally:
        scanners.stop()
