"""TLS inspection end to end: a real node bumps CONNECT tunnels with leaves minted by its CA,
verifies origins against --upstream-ca-file, and applies the whole policy to decrypted requests."""

from __future__ import annotations

import json
import ssl
import urllib.request

import pytest

import harness
from tls_origins import OriginSet, connect_tunnel, https_via_proxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def inspection_policy(**tls):
    section = {"enabled": True, **tls}
    return harness.make_policy(
        rules=[{"name": "no-secret-path", "action": "deny", "reason": "secret area",
                "url_patterns": ["https://localhost:*/secret/*"]}],
        categories={"banking": {"domains": ["bank.localhost"]}},
        content_security={"blocked_extensions": ["exe"]},
        dlp={"detectors": [{"name": "project-x", "type": "keyword", "patterns": ["topsecret-42"], "action": "block"}]},
        connect={"allowed_ports": list(range(1024, 65536, 1))[:0] or [443]},
        tls_inspection=section,
    )


@pytest.fixture(scope="module")
def origins():
    servers = OriginSet()
    yield servers
    servers.stop()


def _policy(origins: OriginSet, **tls) -> dict:
    policy = inspection_policy(**tls)
    policy["connect"] = {"allowed_ports": sorted({o.port for o in origins.all()})}
    return policy


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    node = module_node_factory.start(policy=_policy(origins), name="tls",
                                     args=["--upstream-ca-file", str(origins.ca_file)])
    ca_pem = urllib.request.urlopen(f"http://{node.portal[0]}:{node.portal[1]}/inspection-ca.crt", timeout=5).read()
    node.ca_file = node.state_dir / "client-trusts.pem"
    node.ca_file.write_bytes(ca_pem)
    return node


def get(node, origin, path, **kw):
    return https_via_proxy(node.proxy, "localhost", origin.port, path, cafile=str(node.ca_file), **kw)


def test_inspected_request_reaches_the_origin_and_is_recorded_with_its_https_url(node, origins):
    status, headers, body, der = get(node, origins.good, "/hello?x=1")
    assert status == 200
    echo = json.loads(body)
    assert echo["server"] == "good" and echo["path"] == "/hello?x=1"
    assert echo["headers"].get("Via")  # the proxy read and relayed the request itself
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate(node.ca_file.read_bytes())
    assert leaf.issuer == ca.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    record = node.wait_for_access(lambda r: r["url"] == f"https://localhost:{origins.good.port}/hello?x=1")
    assert record["tls"] == "inspected" and record["status"] == 200 and record["method"] == "GET"
    connect = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["url"] == f"localhost:{origins.good.port}")
    assert connect["tls"] == "inspected"


def test_url_rules_apply_inside_the_tunnel(node, origins):
    status, headers, body, _der = get(node, origins.good, "/secret/plans")
    assert status == 403
    assert b"no-secret-path" in body
    record = node.wait_for_access(lambda r: r["url"].endswith("/secret/plans"))
    assert record["action"] == "deny" and record["tls"] == "inspected"


def test_content_security_applies_inside_the_tunnel(node, origins):
    status, _h, body, _der = get(node, origins.good, "/download/tool.exe")
    assert status == 403 and b"content-security" in body


def test_dlp_applies_to_uploads_inside_the_tunnel(node, origins):
    status, _h, body, _der = get(node, origins.good, "/upload", method="POST", body=b"data topsecret-42 data")
    assert status == 403
    record = node.wait_for_access(lambda r: r["url"].endswith("/upload") and r["method"] == "POST")
    assert record["dlp"] == ["project-x"] and record["tls"] == "inspected"


def test_keep_alive_inside_the_tunnel(node, origins):
    import http.client

    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    conn = http.client.HTTPSConnection(node.proxy[0], node.proxy[1], context=ctx, timeout=10)
    conn.set_tunnel("localhost", origins.good.port)
    for i in range(5):
        conn.request("GET", f"/ka/{i}")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["path"] == f"/ka/{i}"
    conn.close()


@pytest.mark.parametrize("name, expected", [
    ("self_signed", "self-signed certificate"),
    ("expired", "certificate has expired"),
    ("wrong_name", "certificate does not name localhost"),
    ("unknown_ca", "unknown certificate authority"),
])
def test_upstream_certificate_errors_answer_502_inside_tls(node, origins, name, expected):
    origin = getattr(origins, name)
    status, headers, body, _der = get(node, origin, "/x")
    assert status == 502
    proxy_status = headers.get("Proxy-Status", "")
    assert "error=tls_certificate_error" in proxy_status and expected in proxy_status
    assert expected in body.decode()
    record = node.wait_for_access(lambda r: r["url"] == f"https://localhost:{origin.port}/x")
    assert record["action"] == "error" and expected in record["detail"] and record["tls"] == "inspected"


def test_non_http_inside_the_tunnel_is_closed_and_recorded(node, origins):
    sock = connect_tunnel(node.proxy, f"localhost:{origins.good.port}")
    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
    data = b""
    try:
        while chunk := tls.recv(4096):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    tls.close()
    assert data.startswith(b"HTTP/1.1 400")
    node.wait_for_access(lambda r: r["method"] == "-" and r["tls"] == "inspected" and "not a valid HTTP" in (r["detail"] or ""))


def test_client_rejecting_the_certificate_is_recorded(node, origins):
    sock = connect_tunnel(node.proxy, f"localhost:{origins.good.port}")
    ctx = ssl.create_default_context()  # the system store: the inspection CA is not installed
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(sock, server_hostname="localhost")
    sock.close()
    record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and "rejected the inspection certificate" in (r["detail"] or ""))
    assert record["tls"] == "inspected" and record["action"] == "error"


def test_websocket_inside_the_tunnel(node, origins):
    sock = connect_tunnel(node.proxy, f"localhost:{origins.good.port}")
    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"GET /ws HTTP/1.1\r\nHost: localhost:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % origins.good.port)
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    tls.sendall(b"ping-frame")
    echoed = b""
    while len(echoed) < len(b"ping-frame"):
        echoed += tls.recv(4096)
    assert echoed == b"ping-frame"
    tls.close()


def test_misdirected_host_inside_the_tunnel_is_refused(node, origins):
    sock = connect_tunnel(node.proxy, f"localhost:{origins.good.port}")
    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
    data = tls.recv(4096)
    assert data.startswith(b"HTTP/1.1 421")
    tls.close()


def test_ca_certificate_served_without_login_as_pem_and_der(node):
    base = f"http://{node.portal[0]}:{node.portal[1]}"
    pem = urllib.request.urlopen(base + "/inspection-ca.crt", timeout=5).read()
    der = urllib.request.urlopen(base + "/inspection-ca.der", timeout=5).read()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE" not in pem
    assert ssl.PEM_cert_to_DER_cert(pem.decode()) == der
    key = node.state_dir / "tls" / "inspection-ca.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_bypass_by_domain_category_and_client_splices_the_tunnel(node, origins):
    def spliced_issuer():
        # The origin's own certificate reaches the client (it trusts the origin's test CA).
        status, _h, body, der = https_via_proxy(node.proxy, "localhost", origins.good.port, "/b",
                                                cafile=str(origins.ca_file))
        assert status == 200
        from cryptography import x509

        return x509.load_der_x509_certificate(der).issuer

    try:
        node.reload(_policy(origins, bypass_domains=["localhost"]))
        node.wait_for_extended(lambda text: "loaded from" in text and "version" in text, timeout=10)
        harness.wait_until(lambda: _issuer_is_origin(node, origins), 10, "the domain bypass to apply")
        record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["tls"] == "bypassed")
        assert record["detail"] == "bypassed domain"
        policy = _policy(origins, bypass_categories=["banking"])
        policy["categories"]["banking"]["domains"] = ["localhost"]
        node.reload(policy)
        harness.wait_until(lambda: _issuer_is_origin(node, origins), 10, "the category bypass to apply")
        node.reload(_policy(origins, bypass_clients=["127.0.0.0/8"]))
        harness.wait_until(lambda: _issuer_is_origin(node, origins), 10, "the client bypass to apply")
        assert spliced_issuer() is not None
    finally:
        node.reload(_policy(origins))
        harness.wait_until(lambda: not _issuer_is_origin(node, origins), 10, "inspection to resume")


def _issuer_is_origin(node, origins) -> bool:
    try:
        https_via_proxy(node.proxy, "localhost", origins.good.port, "/probe", cafile=str(origins.ca_file))
        return True
    except ssl.SSLError:
        return False


def _get_over(tls, host_header: str, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    try:
        while chunk := tls.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    return data


def test_connect_to_an_ip_is_peeked_and_bumped_by_its_sni(node, origins):
    port = origins.good.port
    sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")
    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="localhost")  # the leaf names the SNI's host
    data = _get_over(tls, f"localhost:{port}", "/peeked")
    assert data.startswith(b"HTTP/1.1 200") and b'"/peeked"' in data
    record = node.wait_for_access(lambda r: r["url"] == f"https://localhost:{port}/peeked")
    assert record["tls"] == "inspected"


def test_connect_to_an_ip_without_sni_gets_an_ip_leaf(node, origins):
    port = origins.good.port
    sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")
    ctx = ssl.create_default_context(cafile=str(node.ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")  # verified against an IP SAN, no SNI sent
    data = _get_over(tls, f"127.0.0.1:{port}", "/by-ip")
    assert data.startswith(b"HTTP/1.1 200") and b'"/by-ip"' in data


def test_connect_to_an_ip_that_is_not_tls_is_closed_and_recorded(node, origins):
    port = origins.good.port
    sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096) == b""
    sock.close()
    record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and "not TLS" in (r["detail"] or ""))
    assert record["url"] == f"127.0.0.1:{port}"


def test_connect_to_an_ip_with_a_bypassed_sni_is_spliced(node, origins):
    port = origins.good.port
    try:
        node.reload(_policy(origins, bypass_domains=["localhost"]))
        harness.wait_until(lambda: _issuer_is_origin(node, origins), 10, "the bypass to apply")
        sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")
        ctx = ssl.create_default_context(cafile=str(origins.ca_file))  # trusts the origin, not the node
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        data = _get_over(tls, f"localhost:{port}", "/spliced")
        # A spliced tunnel keeps half-close semantics: it ends (and is recorded) once the client
        # closes its side too.
        tls.close()
        assert data.startswith(b"HTTP/1.1 200") and b'"/spliced"' in data
        record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["url"] == f"127.0.0.1:{port}"
                                      and r["tls"] == "bypassed")
        assert record["detail"] == "bypassed domain"
    finally:
        node.reload(_policy(origins))
        harness.wait_until(lambda: not _issuer_is_origin(node, origins), 10, "inspection to resume")


def test_curl_verifies_the_minted_leaf_and_gets_http11_by_alpn(node, origins):
    import subprocess

    result = subprocess.run(
        ["curl", "-sS", "-v", "--cacert", str(node.ca_file), "-x", f"http://{node.proxy[0]}:{node.proxy[1]}",
         f"https://localhost:{origins.good.port}/curl?q=1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["path"] == "/curl?q=1"
    assert "ALPN: server accepted http/1.1" in result.stderr


def test_allow_invalid_upstream_domains_tolerates_and_logs(node, origins):
    try:
        node.reload(_policy(origins, allow_invalid_upstream_domains=["localhost"]))

        def tolerated():
            status, _h, body, _der = get(node, origins.self_signed, "/tolerated")
            return status == 200 and json.loads(body)["server"] == "self-signed"

        harness.wait_until(tolerated, 10, "the self-signed origin to be tolerated")
        node.wait_for_extended(lambda text: "tolerated an invalid certificate from localhost" in text
                               and "self-signed certificate" in text)
    finally:
        node.reload(_policy(origins))
        harness.wait_until(lambda: get(node, origins.self_signed, "/again")[0] == 502, 10, "tolerance to end")


def test_a_burst_of_new_hosts_is_minted_off_the_reactor(node, origins):
    """60 tunnels at once, each to a host never seen (CONNECT to an IP, a new SNI each): every
    client gets a leaf for its own name, and the proxy answers a plain request meanwhile."""
    import concurrent.futures

    from cryptography import x509

    port = origins.good.port

    def handshake(i: int) -> list[str]:
        sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")
        ctx = ssl.create_default_context(cafile=str(node.ca_file))
        name = f"burst{i}.example"
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(handshake, i) for i in range(60)]
        # The reactor stays free: a request the proxy answers itself goes through meanwhile.
        blocked = harness.proxy_request(node, "GET", f"https://localhost:{port}/secret/x")
        results = [f.result(timeout=60) for f in futures]
    assert blocked.status == 403
    assert results == [[f"burst{i}.example"] for i in range(60)]


def _processes_using(directory) -> list[int]:
    """Pids whose command line names `directory` (a node's workers carry its state dir)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(directory).encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_a_stopped_node_leaves_no_worker_behind_after_minting(node_factory, origins):
    """The minting threads of every worker stop with it: a worker that had minted a leaf used to
    stay alive after its node stopped, holding the proxy's port."""
    fresh = node_factory.start(policy=_policy(origins), name="tlsstop",
                               args=["--upstream-ca-file", str(origins.ca_file), "--workers", "2"])
    ca_pem = urllib.request.urlopen(f"http://{fresh.portal[0]}:{fresh.portal[1]}/inspection-ca.crt", timeout=5).read()
    fresh.ca_file = fresh.state_dir / "client-trusts.pem"
    fresh.ca_file.write_bytes(ca_pem)
    for i in range(6):  # new connections: both workers take some and mint
        status, _headers, _body, _der = get(fresh, origins.good, f"/hello?stop={i}")
        assert status == 200
    assert len(_processes_using(fresh.state_dir)) >= 2
    fresh.stop()
    harness.wait_until(lambda: not _processes_using(fresh.state_dir), 15, "every worker of the stopped node gone")
