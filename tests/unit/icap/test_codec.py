"""The ICAP message codec (RFC 3507), without sockets."""

from __future__ import annotations

import pytest

from safesquid_tw.icap import codec

URL = codec.parse_service_url("icap://127.0.0.1:1344/avscan")
REQ = b"GET /file.zip HTTP/1.1\r\nHost: example.test\r\n\r\n"
RES = b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: 10\r\n\r\n"


def test_service_urls():
    assert codec.parse_service_url("icap://scanner.local/avscan") == codec.ServiceUrl("scanner.local", 1344, "/avscan")
    assert codec.parse_service_url("icap://[::1]:1345/x").text == "icap://[::1]:1345/x"
    assert codec.parse_service_url("icap://h:1/svc?mode=simple").service == "/svc?mode=simple"
    for bad in ("http://h/x", "icap:///x", "icap://h", "icap://u:p@h/x", "icap://h:99999/x"):
        with pytest.raises(ValueError):
            codec.parse_service_url(bad)


def test_options_request():
    assert codec.options_request(URL) == (
        b"OPTIONS icap://127.0.0.1:1344/avscan ICAP/1.0\r\nHost: 127.0.0.1:1344\r\n"
        b"User-Agent: safesquid-tw-icap/1\r\nEncapsulated: null-body=0\r\n\r\n"
    )


def _split(message: bytes) -> tuple[bytes, bytes]:
    head, _, rest = message.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _encapsulated(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"encapsulated:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no Encapsulated header")


def test_respmod_with_a_whole_body_in_the_preview():
    msg = codec.modification_request(b"RESPMOD", URL, http_request_head=REQ, http_response_head=RES,
                                     body_first=b"0123456789", preview=1024, ieof=True)
    head, rest = _split(msg)
    assert _encapsulated(head) == f"req-hdr=0, res-hdr={len(REQ)}, res-body={len(REQ) + len(RES)}"
    assert b"\r\nPreview: 10\r\n" in head and b"\r\nAllow: 204\r\n" in head
    assert rest == REQ + RES + b"a\r\n0123456789\r\n0; ieof\r\n\r\n"


def test_preview_without_ieof_when_more_follows():
    msg = codec.modification_request(b"RESPMOD", URL, http_request_head=REQ, http_response_head=RES,
                                     body_first=b"abcd", preview=4, ieof=False)
    assert msg.endswith(b"4\r\nabcd\r\n0\r\n\r\n")
    assert b"Preview: 4\r\n" in msg


def test_reqmod_without_a_body_and_without_a_preview():
    msg = codec.modification_request(b"REQMOD", URL, http_request_head=REQ, http_response_head=None,
                                     body_first=None, preview=1024, ieof=True)
    head, rest = _split(msg)
    assert _encapsulated(head) == f"req-hdr=0, null-body={len(REQ)}"
    assert b"Preview" not in head
    assert rest == REQ


def test_body_that_continues_after_the_first_bytes():
    msg = codec.modification_request(b"REQMOD", URL, http_request_head=REQ, http_response_head=None,
                                     body_first=b"", preview=None, ieof=False, body_complete=False)
    head, rest = _split(msg)
    assert _encapsulated(head) == f"req-hdr=0, req-body={len(REQ)}"
    assert rest == REQ  # the chunks follow separately
    assert codec.encode_chunk(b"xyz") == b"3\r\nxyz\r\n"


def test_only_modification_methods():
    with pytest.raises(ValueError):
        codec.modification_request(b"OPTIONS", URL, http_request_head=REQ, http_response_head=None,
                                   body_first=None, preview=None, ieof=False)


C_ICAP_INFECTED = (
    b"ICAP/1.0 200 OK\r\nServer: C-ICAP/0.5.10\r\nConnection: keep-alive\r\n"
    b'ISTag: "CI0001-abc"\r\n'
    b"X-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test-Signature.UNOFFICIAL;\r\n"
    b"X-Violations-Found: 1\r\n\t-\r\n\tEicar-Test-Signature.UNOFFICIAL\r\n\t0\r\n\t0\r\n"
    b"Encapsulated: res-hdr=0, res-body=72\r\n\r\n"
    b"HTTP/1.0 403 Forbidden\r\nServer: C-ICAP\r\nConnection: close\r\nContent-Type: text/html\r\n\r\n"
    b"b\r\n<html>VIRUS\r\n5\r\n</htm\r\n0\r\n\r\n"
)


def test_parse_c_icap_infection_answer_in_pieces():
    # The answer as c-icap sends it (an HTTP/1.0 403 without Content-Length), fed byte by byte.
    head_len = C_ICAP_INFECTED.index(b"\r\n\r\n") + 4
    http_head = C_ICAP_INFECTED[head_len:].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    message = C_ICAP_INFECTED.replace(b"res-body=72", b"res-body=%d" % len(http_head))
    parser = codec.ResponseParser()
    out = []
    for i in range(len(message)):
        out += parser.feed(message[i:i + 1])
    (response,) = out
    assert parser.idle
    assert response.status == 200
    assert response.http_response.status == 403 and response.http_response.get(b"content-type") == b"text/html"
    assert response.body == b"<html>VIRUS</htm"
    assert response.threat() == "Eicar-Test-Signature.UNOFFICIAL"
    assert response.get("istag") == '"CI0001-abc"'


def test_threat_from_violations_only():
    response = codec.IcapResponse(200, "OK", (("X-Violations-Found", "1\n-\nWorm.Test\n0\n0"),))
    assert response.threat() == "Worm.Test"


def test_parse_204_then_100_then_options_on_one_stream():
    stream = (
        b'ICAP/1.0 204 Unmodified\r\nISTag: "x"\r\n\r\n'
        b"ICAP/1.0 100 Continue\r\n\r\n"
        b"ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: \"CI0001-1\"\r\nTransfer-Preview: *\r\n"
        b"Transfer-Ignore: jpg, png\r\nTransfer-Complete: exe\r\n"
        b"Options-TTL: 3600\r\nPreview: 1024\r\nAllow: 204\r\nMax-Connections: 20\r\nEncapsulated: null-body=0\r\n\r\n"
    )
    responses = codec.ResponseParser().feed(stream)
    assert [r.status for r in responses] == [204, 100, 200]
    options = codec.parse_options(responses[2])
    assert options.methods == {"RESPMOD", "REQMOD"} and options.istag == "CI0001-1"
    assert options.preview == 1024 and options.allow_204 and options.max_connections == 20 and options.ttl == 3600
    assert options.transfer_mode("jpg") == "ignore"
    assert options.transfer_mode("exe") == "complete"
    assert options.transfer_mode("zip") == "preview"


def test_modified_message_with_request_and_response_heads():
    req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    res = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    message = (b"ICAP/1.0 200 OK\r\nEncapsulated: req-hdr=0, res-hdr=%d, res-body=%d\r\n\r\n" % (len(req), len(req) + len(res))
               + req + res + b"3\r\nnew\r\n0\r\n\r\n")
    (response,) = codec.ResponseParser().feed(message)
    assert response.http_request.start_line == b"GET / HTTP/1.1"
    assert response.http_response.status == 200 and response.body == b"new"
    assert response.threat() is None


def test_null_body_answer():
    res = b"HTTP/1.1 403 Forbidden\r\n\r\n"
    message = b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, null-body=%d\r\n\r\n" % len(res) + res
    (response,) = codec.ResponseParser().feed(message)
    assert response.http_response.status == 403 and response.body is None


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"ICAP/1.0 2000 OK\r\n\r\n",
    b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0, res-hdr=5\r\n\r\n",
    b"ICAP/1.0 200 OK\r\nEncapsulated: nonsense\r\n\r\n",
    b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\nzz\r\n",
    b"ICAP/1.0 200 OK\r\nbroken header\r\n\r\n",
])
def test_malformed_answers_are_refused(bad):
    with pytest.raises(codec.IcapProtocolError):
        codec.ResponseParser().feed(bad)


def test_a_body_larger_than_the_bound_is_refused():
    parser = codec.ResponseParser(max_body=10)
    with pytest.raises(codec.IcapProtocolError):
        parser.feed(b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\nb\r\n")


def test_options_must_name_methods():
    (response,) = codec.ResponseParser().feed(b"ICAP/1.0 200 OK\r\nEncapsulated: null-body=0\r\n\r\n")
    with pytest.raises(codec.IcapProtocolError):
        codec.parse_options(response)
