"""The control plane's wire contract: every remote method's arguments and results, and chunks."""

from __future__ import annotations

import hashlib

import pytest

from safesquid_tw.cluster import wire
from safesquid_tw.cluster.wire import (
    MAX_CHUNK_BYTES,
    BlobAssembler,
    BlobManifest,
    WireError,
    check_args,
    check_result,
    split_blob,
)


class FakeRemote:
    def callRemote(self, name, *args, **kwargs):
        raise AssertionError("not called in these tests")


NONCE = b"n" * 32
DIGEST = b"d" * 32

VALID_CALLS = [
    ("gate", "hello", (1, "0.1.0", "node-1.example", NONCE), {}),
    ("gate", "hello", (), {"protocol": 1, "product": "0.1.0.dev3+g1", "node": "n", "nonce": NONCE}),
    ("gate", "prove", (b"p" * 32, FakeRemote()), {}),
    ("avatar", "ping", (), {}),
    ("avatar", "report_status", ({"policy_version": 0, "uptime": 1.5, "spool_records": 0, "spool_bytes": 0},), {}),
    (
        "avatar",
        "report_status",
        (
            {
                "policy_version": 7,
                "uptime": 3,
                "spool_records": 10,
                "spool_bytes": 2000,
                "counters": {"requests": 5, "blocked.total": 1},
                "detail": "ok",
            },
        ),
        {},
    ),
    ("avatar", "policy_manifest", (), {}),
    ("avatar", "policy_chunk", (3, 0), {}),
    ("avatar", "policy_chunk", (3,), {"index": 5}),
    ("avatar", "policy_applied", (3, False, "access.rules[0]: bad domain"), {}),
    ("avatar", "ship_log_batch", (17, 0, [b'{"a":1}', b'{"a":2}']), {}),
    ("mind", "ping", (), {}),
    ("mind", "policy_changed", (4,), {}),
]


@pytest.mark.parametrize("interface,method,args,kwargs", VALID_CALLS)
def test_valid_calls_pass_and_come_back_positional(interface, method, args, kwargs):
    values = check_args(interface, method, args, kwargs)
    params = wire.contract(interface, method).params
    assert len(values) == len(params)
    assert values[: len(args)] == tuple(args)
    for param, value in zip(params[len(args) :], values[len(args) :]):
        assert value is kwargs[param.name]


INVALID_CALLS = [
    # (interface, method, args, kwargs, words the message must contain)
    ("gate", "hello", (1, "0.1.0", "n", b"short"), {}, ["hello()", "'nonce'", "exactly 32 bytes"]),
    ("gate", "hello", (True, "0.1.0", "n", NONCE), {}, ["'protocol'", "must be an int"]),
    ("gate", "hello", (1, "0.1.0", "../etc", NONCE), {}, ["'node'", "node name"]),
    ("gate", "hello", (1, "0.1.0", "n" * 254, NONCE), {}, ["'node'", "more than 253"]),
    ("gate", "hello", (1, "0.1.0 ; rm", "n", NONCE), {}, ["'product'", "release number"]),
    ("gate", "hello", (1, "0.1.0", "n"), {}, ["lacks the argument 'nonce'"]),
    ("gate", "hello", (1, "0.1.0", "n", NONCE, 5), {}, ["takes 4 arguments"]),
    ("gate", "hello", (1, "0.1.0", "n", NONCE), {"extra": 1}, ["unexpected argument 'extra'"]),
    ("gate", "hello", (1, "0.1.0", "n", "n" * 32), {}, ["'nonce'", "must be bytes, not str"]),
    ("gate", "prove", (b"p" * 32, "not a reference"), {}, ["'mind'", "remote reference"]),
    ("gate", "prove", (b"p" * 31, FakeRemote()), {}, ["'proof'", "exactly 32"]),
    ("avatar", "ping", (1,), {}, ["takes 0 arguments"]),
    ("avatar", "policy_chunk", (-1, 0), {}, ["'version'", "0..", "not -1"]),
    ("avatar", "policy_chunk", (1, 1.0), {}, ["'index'", "must be an int, not float"]),
    ("avatar", "policy_chunk", (1, wire.MAX_BLOB_CHUNKS), {}, ["'index'"]),
    ("avatar", "policy_applied", (1, 1, "x"), {}, ["'ok'", "must be a bool, not int"]),
    ("avatar", "policy_applied", (1, True, "x" * 5000), {}, ["'detail'", "more than 4096"]),
    (
        "avatar",
        "report_status",
        ({"policy_version": 0, "uptime": 1.0, "spool_records": 0},),
        {},
        ["lacks the key 'spool_bytes'"],
    ),
    (
        "avatar",
        "report_status",
        ({"policy_version": 0, "uptime": 1.0, "spool_records": 0, "spool_bytes": 0, "surprise": 1},),
        {},
        ["unknown key 'surprise'"],
    ),
    (
        "avatar",
        "report_status",
        ({"policy_version": 0, "uptime": float("nan"), "spool_records": 0, "spool_bytes": 0},),
        {},
        ["'uptime'", "finite"],
    ),
    (
        "avatar",
        "report_status",
        ({"policy_version": 0, "uptime": 1, "spool_records": 0, "spool_bytes": 0, "counters": {"Bad Name": 1}},),
        {},
        ["counter name"],
    ),
    (
        "avatar",
        "report_status",
        (
            {
                "policy_version": 0,
                "uptime": 1,
                "spool_records": 0,
                "spool_bytes": 0,
                "counters": {f"c{i}": i for i in range(65)},
            },
        ),
        {},
        ["65 entries, more than 64"],
    ),
    ("avatar", "report_status", ([],), {}, ["'status'", "must be a dict, not list"]),
    ("avatar", "ship_log_batch", (1, 0, []), {}, ["'records'", "1..1000 items, not 0"]),
    ("avatar", "ship_log_batch", (1, 0, [b"x"] * 1001), {}, ["1..1000 items, not 1001"]),
    ("avatar", "ship_log_batch", (1, 0, [b"x", "y"]), {}, ["'records'[1]", "must be bytes, not str"]),
    ("avatar", "ship_log_batch", (1, 0, [b"x" * (256 * 1024 + 1)]), {}, ["'records'[0]", "more than 262144"]),
    (
        "avatar",
        "ship_log_batch",
        (1, 0, [b"x" * (200 * 1024)] * 3),
        {},
        ["'records'", "bytes in all, more than 524288"],
    ),
    ("avatar", "ship_log_batch", (1, 0, {b"x"}), {}, ["'records'", "must be a list, not set"]),
    ("mind", "policy_changed", ("3",), {}, ["'version'", "must be an int, not str"]),
    ("avatar", "no_such_method", (), {}, ["avatar has no remote method 'no_such_method'"]),
]


@pytest.mark.parametrize("interface,method,args,kwargs,words", INVALID_CALLS)
def test_invalid_calls_are_refused_with_a_clear_message(interface, method, args, kwargs, words):
    with pytest.raises(WireError) as excinfo:
        check_args(interface, method, args, kwargs)
    for word in words:
        assert word in str(excinfo.value)


RESULTS = [
    ("gate", "hello", {"protocol": 1, "product": "0.1.0", "nonce": NONCE}, True),
    ("gate", "hello", {"protocol": 1, "product": "0.1.0"}, False),
    ("gate", "prove", {"proof": b"p" * 32, "avatar": FakeRemote()}, True),
    ("gate", "prove", {"proof": b"p" * 32, "avatar": None}, False),
    ("avatar", "ping", None, True),
    ("avatar", "ping", 0, False),
    ("avatar", "policy_manifest", {"version": 2, "size": 10, "sha256": DIGEST, "chunk_size": 4096, "chunks": 1}, True),
    ("avatar", "policy_manifest", {"version": 2, "size": 10, "sha256": DIGEST, "chunk_size": 10, "chunks": 1}, False),
    ("avatar", "policy_chunk", b"x" * MAX_CHUNK_BYTES, True),
    ("avatar", "policy_chunk", b"x" * (MAX_CHUNK_BYTES + 1), False),
    ("avatar", "ship_log_batch", 3, True),
    ("avatar", "ship_log_batch", -1, False),
    ("mind", "policy_changed", None, True),
]


@pytest.mark.parametrize("interface,method,value,ok", RESULTS)
def test_results_are_checked(interface, method, value, ok):
    if ok:
        assert check_result(interface, method, value) is value
    else:
        with pytest.raises(WireError, match=rf"the result of {method}\(\)"):
            check_result(interface, method, value)


def test_limits_stay_well_under_banana():
    from twisted.spread import banana

    assert wire.BANANA_SIZE_LIMIT == banana.SIZE_LIMIT
    assert wire.MAX_MESSAGE_BYTES <= 0.8 * banana.SIZE_LIMIT
    assert wire.MAX_CHUNK_BYTES <= wire.MAX_MESSAGE_BYTES
    assert wire.MAX_LOG_BATCH_RECORDS < banana.SIZE_LIMIT  # banana limits list lengths too


def test_log_record_limit_matches_the_spool():
    from safesquid_tw.accesslog.spool import MAX_RECORD_BYTES

    assert wire.MAX_LOG_RECORD_BYTES == MAX_RECORD_BYTES


class Avatar:
    def __init__(self):
        self.calls = []

    @wire.checked("avatar")
    def perspective_policy_chunk(self, version, index):
        self.calls.append((version, index))
        return b"chunk"


def test_checked_decorator_validates_before_the_body_runs():
    avatar = Avatar()
    assert avatar.perspective_policy_chunk(1, index=2) == b"chunk"
    with pytest.raises(WireError, match="'index'"):
        avatar.perspective_policy_chunk(1, "2")
    assert avatar.calls == [(1, 2)]


def test_checked_decorator_refuses_a_method_missing_from_the_contract():
    with pytest.raises(WireError, match="no remote method 'reboot'"):

        class Bad:
            @wire.checked("avatar")
            def perspective_reboot(self):
                pass


@pytest.mark.parametrize(
    "size,chunk_size,chunks",
    [(0, 1024, 0), (1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2), (MAX_CHUNK_BYTES * 3 + 7, MAX_CHUNK_BYTES, 4)],
)
def test_split_and_reassemble_in_any_order(size, chunk_size, chunks):
    blob = bytes(i % 251 for i in range(size))
    manifest, parts = split_blob(blob, chunk_size)
    assert manifest == BlobManifest(size, hashlib.sha256(blob).digest(), chunk_size, chunks)
    assert len(parts) == chunks and all(len(p) <= chunk_size for p in parts)
    received = BlobManifest.from_wire(manifest.to_wire())
    assembler = BlobAssembler(received)
    for index in reversed(range(chunks)):
        assembler.add(index, parts[index])
    if parts:
        assembler.add(0, parts[0])  # a repeated chunk is harmless
    assert assembler.complete
    assert assembler.result() == blob


def test_manifest_from_wire_checks_the_chunk_count_and_types():
    good = {"size": 3000, "sha256": DIGEST, "chunk_size": 1024, "chunks": 3, "version": 9}
    assert BlobManifest.from_wire(good).chunks == 3
    with pytest.raises(WireError, match="says 2 chunks, but 3000 bytes in chunks of 1024 make 3"):
        BlobManifest.from_wire({**good, "chunks": 2})
    with pytest.raises(WireError, match="'sha256'"):
        BlobManifest.from_wire({**good, "sha256": b"short"})
    with pytest.raises(WireError, match="must be a dict"):
        BlobManifest.from_wire([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "index,chunk,message",
    [
        (2, b"x" * 1024, "outside 0..1"),
        (-1, b"x" * 1024, "outside 0..1"),
        (True, b"x" * 1024, "outside 0..1"),
        (0, b"x" * 1000, "chunk 0 is 1000 bytes, expected 1024"),
        (1, b"x" * 1024, "chunk 1 is 1024 bytes, expected 976"),
        (0, "x" * 1024, "must be bytes"),
    ],
)
def test_assembler_refuses_bad_chunks(index, chunk, message):
    manifest, _parts = split_blob(b"a" * 2000, 1024)
    with pytest.raises(WireError, match=message):
        BlobAssembler(manifest).add(index, chunk)


def test_assembler_refuses_a_conflicting_repeat_and_a_wrong_digest():
    manifest, parts = split_blob(b"a" * 2000, 1024)
    assembler = BlobAssembler(manifest)
    assembler.add(0, parts[0])
    with pytest.raises(WireError, match="twice with different content"):
        assembler.add(0, b"b" * 1024)
    with pytest.raises(WireError, match="1 chunks are still missing"):
        assembler.result()
    assert assembler.missing() == [1]
    forged = BlobAssembler(BlobManifest(2000, hashlib.sha256(b"other").digest(), 1024, 2))
    forged.add(0, parts[0])
    forged.add(1, parts[1])
    with pytest.raises(WireError, match="does not match its SHA-256"):
        forged.result()


@pytest.mark.parametrize("chunk_size", [0, 1023, MAX_CHUNK_BYTES + 1])
def test_split_refuses_chunk_sizes_out_of_range(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        split_blob(b"abc", chunk_size)


# --- ship_log_lines: a batch as its joined spool lines ------------------------------------------


def test_log_lines_join_and_split_back_into_the_same_records():
    from safesquid_tw.cluster.wire import join_log_lines, split_log_lines

    records = [b'{"a":1}', b"", b'{"b":"x y"}']
    lines = join_log_lines(records)
    assert lines == b'{"a":1}\n\n{"b":"x y"}'
    assert split_log_lines(lines) == records
    check_args("avatar", "ship_log_lines", (1, 0, lines), {})


def test_a_batch_that_cannot_travel_as_lines_is_shipped_as_a_list():
    from safesquid_tw.cluster.wire import MAX_LOG_BATCH_RECORDS, join_log_lines

    assert join_log_lines([b'{"a":1}', b'{"b":\n2}']) is None  # a newline inside a record
    assert join_log_lines([]) is None
    assert join_log_lines([b"{}"] * (MAX_LOG_BATCH_RECORDS + 1)) is None
    assert join_log_lines([b"x" * (200 * 1024)] * 3) is None


@pytest.mark.parametrize(
    "lines, words",
    [
        (b"\n".join([b"x"] * 1001), ["1001 records, more than 1000"]),
        (b"x" * (256 * 1024 + 1), ["more than 262144 bytes"]),
        (b"x" * (525 * 1024), ["'lines'", "more than 525288"]),
        (b"\n".join([b"x" * (256 * 1024)] * 2 + [b"x"]), ["more than 524288 bytes"]),
    ],
)
def test_log_lines_are_held_to_the_limits_of_a_list_batch(lines, words):
    from safesquid_tw.cluster.wire import split_log_lines

    with pytest.raises(WireError) as excinfo:
        check_args("avatar", "ship_log_lines", (1, 0, lines), {})
        split_log_lines(lines)
    for word in words:
        assert word in str(excinfo.value)
