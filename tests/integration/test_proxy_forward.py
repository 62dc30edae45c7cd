"""Forward proxying of plain HTTP: curl, treq, keep-alive, pooling, streaming, back-pressure."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest
import pytest_twisted

import harness
from harness import RawConnection, build_request, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GIB = 1 << 30
RSS_GROWTH_LIMIT = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    return module_node_factory.start(policy=harness.make_policy(), name="forward")


@pytest.fixture(scope="module")
def one_process_node(module_node_factory, origins):
    # Origin connections are pooled per worker process: with several workers, two client
    # connections may be served by different workers, each with a pool of its own.
    return module_node_factory.start(policy=harness.make_policy(), args=["--workers", "1"], name="forward1")


# -- curl ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version_flag, version", [("--http1.1", "HTTP/1.1"), ("--http1.0", "HTTP/1.0")])
def test_curl_get(node, origins, version_flag, version):
    result = harness.curl("-x", node.proxy_url, version_flag, "-H", "X-Test: get",
                          origins.url("/curl/get?q=1"))
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    echo = result.json()
    assert echo["method"] == "GET"
    assert echo["target"] == "/curl/get?q=1", "the origin must get origin-form, not the absolute URL"
    assert harness.echo_headers(echo, "x-test") == ["get"]
    assert harness.echo_headers(echo, "host") == [origins.authority()]


@pytest.mark.parametrize("version_flag", ["--http1.1", "--http1.0"])
def test_curl_post(node, origins, version_flag):
    payload = "name=value&" + "x" * 500
    result = harness.curl("-x", node.proxy_url, version_flag, "--data-binary", payload, origins.url("/curl/post"))
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    echo = result.json()
    assert echo["method"] == "POST"
    assert echo["body_len"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload.encode()).hexdigest()


def test_curl_reuses_the_client_connection(node, origins):
    result = harness.curl("-v", "-x", node.proxy_url, origins.url("/curl/one"), origins.url("/curl/two"))
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    assert "Re-using existing connection" in result.stderr or "Reusing existing connection" in result.stderr, \
        result.stderr


# -- treq ---------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_treq_through_proxy_agent(node, origins):
    import treq
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.web.client import HTTPConnectionPool, ProxyAgent

    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(ProxyAgent(TCP4ClientEndpoint(reactor, *node.proxy, timeout=5), reactor, pool))
    response = yield client.get(origins.url("/treq/get"), timeout=10)
    assert response.code == 200
    echo = yield response.json()
    assert echo["target"] == "/treq/get"
    response = yield client.post(origins.url("/treq/post"), data=b"treq-body" * 100, timeout=10)
    assert response.code == 200
    echo = yield response.json()
    assert echo["method"] == "POST" and echo["body_len"] == 900
    yield pool.closeCachedConnections()


# -- connections --------------------------------------------------------------------------------


def test_keep_alive_toward_the_client(node, origins):
    with RawConnection(node.proxy) as conn:
        for path in ("/ka/1", "/ka/2", "/ka/3"):
            conn.send(build_request("GET", origins.url(path)))
            response = conn.read_response()
            assert response.status == 200
            assert response.json()["target"] == path
            assert not response.closed
        assert conn.wait_closed(0.3) is None, "the proxy closed a keep-alive connection"


def test_http10_client_is_answered_and_closed(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", origins.url("/ten"), version="HTTP/1.0"))
        response = conn.read_response(close_wait=5)
    assert response.status == 200
    assert response.json()["target"] == "/ten"
    assert response.closed
    assert not response.has_header("transfer-encoding")


def test_origin_connections_are_pooled(one_process_node, origins):
    node = one_process_node
    # http2 is an origin no other test of this module talks to: its pool starts empty here.
    conns = set()
    for _client_connection in range(2):
        with RawConnection(node.proxy) as conn:
            for i in range(3):
                conn.send(build_request("GET", origins.url(f"/pool/{i}", name="http2")))
                response = conn.read_response()
                assert response.status == 200
                conns.add(response.json()["conn"])
    assert len(conns) == 1, f"six sequential requests used {len(conns)} origin connections"


def test_client_connection_close_is_not_forwarded_and_the_pool_survives(one_process_node, origins):
    node = one_process_node
    conns = set()
    for i in range(3):
        response = proxy_request(node, "GET", origins.url(f"/pool-close/{i}", name="http2"),
                                 headers=[("Connection", "close")])
        assert response.status == 200
        echo = response.json()
        assert all("close" not in v.lower() for v in harness.echo_headers(echo, "connection"))
        conns.add(echo["conn"])
    assert len(conns) == 1


def test_pipelined_requests_are_answered_in_order(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", origins.url("/slow?delay=0.3&first"))
                  + build_request("GET", origins.url("/pipe/second"))
                  + build_request("POST", origins.url("/pipe/third"), body=b"3" * 10))
        targets = [conn.read_response().json()["target"] for _ in range(3)]
    assert targets == ["/slow?delay=0.3&first", "/pipe/second", "/pipe/third"]


# -- bodies -------------------------------------------------------------------------------------


def test_content_length_upload_is_streamed(node, origins):
    size = 128 << 20
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    baseline = node.rss_bytes()
    peak = baseline
    with RawConnection(node.proxy, timeout=60) as conn:
        conn.send(build_request("POST", origins.url("/upload/cl"), headers=[("Content-Length", str(size))]))
        for _ in range(size // len(block)):
            conn.send(block)
            digest.update(block)
            peak = max(peak, node.rss_bytes())
        response = conn.read_response(timeout=60)
    assert response.status == 200
    echo = response.json()
    assert echo["body_len"] == size
    assert echo["body_sha256"] == digest.hexdigest()
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - baseline) >> 20} MiB during a 128 MiB upload"


def test_chunked_upload_is_relayed(node, origins):
    pieces = [b"a" * 10, b"b" * 4000, b"c" * 70000, b"d"]
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("POST", origins.url("/upload/chunked"), headers=[("Transfer-Encoding", "chunked")]))
        for piece in pieces:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.02)  # separate writes, so the proxy sees the body arrive in pieces
        conn.send(b"0\r\n\r\n")
        response = conn.read_response()
    assert response.status == 200
    echo = response.json()
    body = b"".join(pieces)
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_response_is_relayed(node, origins):
    response = proxy_request(node, "GET", origins.url("/chunked?chunks=7&size=1000&interval=0.02"))
    assert response.status == 200
    assert response.body == b"".join(bytes([97 + i]) * 1000 for i in range(7))
    assert "chunked" in (response.header("transfer-encoding") or "").lower() or response.has_header("content-length")


def test_chunked_response_to_http10_client_is_not_chunked(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", origins.url("/chunked?chunks=3&size=500"), version="HTTP/1.0"))
        response = conn.read_response(close_wait=5)
    assert response.status == 200
    assert not response.has_header("transfer-encoding")
    assert response.body == b"a" * 500 + b"b" * 500 + b"c" * 500


# -- 100-continue -------------------------------------------------------------------------------


def test_curl_expect_100_continue_does_not_stall(node, origins, tmp_path):
    # curl asks for 100-continue on its own for large bodies (over 1 KiB or 1 MiB depending on
    # its version); 2 MiB is over both. It then waits up to --expect100-timeout for the 100.
    payload = tmp_path / "payload"
    payload.write_bytes(b"p" * (2 << 20))
    result = harness.curl("-v", "-x", node.proxy_url, "--expect100-timeout", "6", "--data-binary", f"@{payload}",
                          origins.url("/expect/curl"))
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    assert "Expect: 100-continue" in result.stderr
    assert result.json()["body_len"] == 2 << 20
    assert result.seconds < 3, f"curl waited {result.seconds:.1f}s for 100 Continue"


def test_100_continue_reaches_the_client_before_the_body(node, origins):
    body = b"q" * 3000
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("POST", origins.url("/expect/raw"),
                                headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
        status, _headers = conn.read_head(timeout=5)
        assert status == 100
        conn.send(body)
        response = conn.read_response()
    assert response.status == 200
    echo = response.json()
    assert echo["body_len"] == len(body)
    assert not echo["body_before_100"]


# -- large bodies and back-pressure -------------------------------------------------------------


def _start_download(conn: RawConnection, origins, size: int) -> int:
    conn.send(build_request("GET", origins.url(f"/large?bytes={size}")))
    status, headers = conn.read_head(timeout=10)
    assert status == 200
    assert dict((n.lower(), v) for n, v in headers).get("content-length") == str(size)
    received = len(conn.buffer)
    conn.buffer.clear()
    return received


def test_one_gib_download_keeps_memory_flat(node, origins):
    baseline = node.rss_bytes()
    peak = baseline
    buf = bytearray(1 << 20)
    deadline = time.monotonic() + 100
    with RawConnection(node.proxy, timeout=30) as conn:
        received = _start_download(conn, origins, GIB)
        next_sample = 0
        while received < GIB:
            assert time.monotonic() < deadline, f"only {received >> 20} MiB after 100 s"
            n = conn.sock.recv_into(buf)
            assert n, f"connection closed after {received} bytes"
            received += n
            if received >= next_sample:
                peak = max(peak, node.rss_bytes())
                next_sample = received + (16 << 20)
    assert received == GIB
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - baseline) >> 20} MiB"


def test_slow_reader_does_not_make_the_node_buffer(node, origins):
    baseline = node.rss_bytes()
    with RawConnection(node.proxy, timeout=30) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        received = _start_download(conn, origins, GIB)
        while received < (1 << 20):
            received += len(conn.read_some())
        # Stop reading: without back-pressure the node would now pull the origin's gigabyte in.
        peak = baseline
        stop = time.monotonic() + 4
        while time.monotonic() < stop:
            peak = max(peak, node.rss_bytes())
            time.sleep(0.2)
        assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - baseline) >> 20} MiB with a paused reader"
        # Reading again resumes the flow.
        more = 0
        while more < (8 << 20):
            data = conn.read_some(timeout=10)
            assert data, "the download did not resume"
            more += len(data)
    assert node.health()[0] == 200


def test_concurrent_clients(node, origins):
    targets: list[str] = []
    errors: list[Exception] = []

    def client(i: int) -> None:
        try:
            with RawConnection(node.proxy) as conn:
                for j in range(5):
                    conn.send(build_request("GET", origins.url(f"/concurrent/{i}/{j}")))
                    targets.append(conn.read_response().json()["target"])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(targets) == sorted(f"/concurrent/{i}/{j}" for i in range(10) for j in range(5))
