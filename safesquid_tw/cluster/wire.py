"""The control plane's wire contract: limits, every remote method's arguments and results, chunks.

Master and slaves talk Perspective Broker inside TLS (ALPN `safesquid-cluster/1` on the portal
port). Three kinds of object answer remote calls:

- ``gate``: the master's root object, reachable before authentication. Only the key proof:
  ``hello(protocol, product, node, nonce) -> {"protocol", "product", "nonce"}`` then
  ``prove(proof, mind) -> {"proof", "avatar"}``.
- ``avatar``: the master's object for one authenticated slave (``mind`` above is the slave's).
  ``ping()``, ``report_status(status)``, ``policy_manifest()``, ``policy_chunk(version, index)``,
  ``policy_applied(version, ok, detail)``, ``ship_log_batch(segment, first_seq, records)``,
  ``policy_change(version, base)`` (the sections changed since the slave's version, or nothing),
  ``ship_log_lines(segment, first_seq, lines)`` (the same batch as newline-joined spool lines).
- ``mind``: the slave's object, handed to the master in ``prove``.
  ``ping()``, ``policy_changed(version)``.

Every argument and every result is checked here, by type and by size, before any code acts on
it; a violation raises `WireError` naming the method, the argument and what was wrong. Banana,
PB's encoding, drops the whole connection on any string or list longer than 640 KiB, so every
limit below stays well under it, and large blobs (the policy document) travel in chunks
(`split_blob` / `BlobAssembler`) whose SHA-256 is checked on arrival.

Pure module: no Twisted import, tested by tables.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

import attrs

from safesquid_tw.cluster.wirecheck import (
    MAX_INT,
    MAX_MESSAGE_BYTES,
    MAX_TEXT,
    Bool,
    Bytes,
    Float,
    Int,
    ListOf,
    MapOf,
    NoneValue,
    Record,
    Remote,
    Text,
    WireError,
    _type_name,
)

# Bump on any incompatible change to this file or to wirecheck.py: nodes with different values
# refuse each other.
PROTOCOL_VERSION = 1
ALPN_CONTROL_PLANE = b"safesquid-cluster/1"
ALPN_HTTP1 = b"http/1.1"

# Banana's per-string and per-list limit (twisted.spread.banana.SIZE_LIMIT); a test keeps them equal.
BANANA_SIZE_LIMIT = 640 * 1024
MAX_CHUNK_BYTES = 256 * 1024  # one policy chunk
MAX_BLOB_BYTES = 64 * 1024 * 1024  # a whole policy document
MIN_CHUNK_BYTES = 1024  # the smallest chunk size a sender may choose
MAX_BLOB_CHUNKS = -(-MAX_BLOB_BYTES // MIN_CHUNK_BYTES)
MAX_LOG_BATCH_RECORDS = 1000
MAX_LOG_RECORD_BYTES = 256 * 1024  # equals the spool's MAX_RECORD_BYTES
MAX_STATUS_COUNTERS = 64
# ship_log_lines: a batch's records and the newlines between them
MAX_LOG_LINES_BYTES = MAX_MESSAGE_BYTES + MAX_LOG_BATCH_RECORDS
NONCE_BYTES = 32
PROOF_BYTES = 32
DIGEST_BYTES = 32

assert MAX_LOG_LINES_BYTES < BANANA_SIZE_LIMIT and MAX_MESSAGE_BYTES < BANANA_SIZE_LIMIT and MAX_CHUNK_BYTES <= MAX_MESSAGE_BYTES

# Compiled once: these run on every remote call.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_PRODUCT_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
_COUNTER_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")


# --- the contract ------------------------------------------------------------------------------

NODE_NAME = Text(253, _NODE_NAME, "a node name (letters, digits, '.', '_', '-')")
PRODUCT_VERSION = Text(64, _PRODUCT_VERSION, "a release number such as 0.1.0")
NONCE = Bytes(exact_len=NONCE_BYTES)
PROOF = Bytes(exact_len=PROOF_BYTES)
DIGEST = Bytes(exact_len=DIGEST_BYTES)
VERSION = Int(0, MAX_INT)

BLOB_MANIFEST_FIELDS: dict[str, Any] = {
    "size": Int(0, MAX_BLOB_BYTES),
    "sha256": DIGEST,
    "chunk_size": Int(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
    "chunks": Int(0, MAX_BLOB_CHUNKS),
}
POLICY_MANIFEST = Record({"version": VERSION, **BLOB_MANIFEST_FIELDS})
# One ICAP service as a slave's scanner sees it (safesquid_tw/icap/status.py).
ANTIVIRUS_SERVICE = Record({
    "url": Text(1024), "state": Text(16), "istag": Text(256), "scans": Int(), "detections": Int(),
    "failures": Int(), "latency_ms": Float(-1.0),
})
# One worker process of a slave started with --workers (safesquid_tw/workers/pool.py).
WORKER_STATUS = Record({"pid": Int(), "state": Text(16), "policy_version": Int(0, MAX_INT), "connections": Int()})
MAX_WORKERS = 256
SLAVE_STATUS = Record(
    {
        "policy_version": Int(0, MAX_INT),  # 0: the slave has no policy yet
        "uptime": Float(),
        "spool_records": Int(),
        "spool_bytes": Int(),
        "counters": MapOf(Text(64, _COUNTER_NAME, "a counter name"), Int(), MAX_STATUS_COUNTERS),
        "detail": Text(),
        "clock": Float(),  # the slave's wall clock when it sent this, for the offset warning
        "policy_digest": Text(100),
        "policy_source": Text(100),
        "draining": Bool(),
        "ready": Bool(),
        "requests_per_second": Float(),
        "directory": Text(300),  # the user directory as this node sees it (absent: none)
        "antivirus": ListOf(ANTIVIRUS_SERVICE, 16),
        "workers": ListOf(WORKER_STATUS, MAX_WORKERS),  # sent only by a node with --workers
    },
    optional=frozenset(
        {"counters", "detail", "clock", "policy_digest", "policy_source", "draining", "ready", "requests_per_second",
         "directory", "antivirus", "workers"}
    ),
)
TASK_NAME = Text(16, re.compile(r"reload|drain|resume"), "one of reload, drain, resume")
MAX_CA_PEM_BYTES = 64 * 1024
CA_FINGERPRINT = Text(64, re.compile(r"[0-9a-f]{64}|"), "a SHA-256 in hex (empty: no CA)")
INSPECTION_CA = Record({"fingerprint": CA_FINGERPRINT, "cert": Bytes(MAX_CA_PEM_BYTES), "key": Bytes(MAX_CA_PEM_BYTES)})


@attrs.frozen
class Param:
    name: str
    spec: Any


@attrs.frozen
class MethodContract:
    interface: str
    name: str
    params: tuple[Param, ...]
    result: Any

    def check_args(self, args: Sequence[object], kwargs: Mapping[str, object]) -> tuple[object, ...]:
        """The arguments in declaration order, each checked; keyword arguments are accepted by name."""
        if len(args) > len(self.params):
            raise WireError(f"{self.name}() takes {len(self.params)} arguments, not {len(args)}")
        values: list[object] = list(args)
        for param in self.params[len(args) :]:
            if param.name not in kwargs:
                raise WireError(f"{self.name}() lacks the argument {param.name!r}")
            values.append(kwargs[param.name])
        expected = {p.name for p in self.params[len(args) :]}
        for key in kwargs:
            if key not in expected:
                raise WireError(f"{self.name}() got an unexpected argument {str(key)[:80]!r}")
        for param, value in zip(self.params, values):
            param.spec.check(value, f"{self.name}() argument {param.name!r}")
        return tuple(values)

    def check_result(self, value: object) -> object:
        self.result.check(value, f"the result of {self.name}()")
        return value


def _contract(interface: str, name: str, result: Any, *params: tuple[str, Any]) -> MethodContract:
    return MethodContract(interface, name, tuple(Param(n, s) for n, s in params), result)


_ALL = [
    _contract(
        "gate",
        "hello",
        Record({"protocol": Int(), "product": PRODUCT_VERSION, "nonce": NONCE}),
        ("protocol", Int()),
        ("product", PRODUCT_VERSION),
        ("node", NODE_NAME),
        ("nonce", NONCE),
    ),
    _contract(
        "gate", "prove", Record({"proof": PROOF, "avatar": Remote()}), ("proof", PROOF), ("mind", Remote())
    ),
    _contract("avatar", "ping", NoneValue()),
    _contract("avatar", "report_status", NoneValue(), ("status", SLAVE_STATUS)),
    _contract("avatar", "policy_manifest", POLICY_MANIFEST),
    _contract(
        "avatar",
        "policy_chunk",
        Bytes(MAX_CHUNK_BYTES),
        ("version", VERSION),
        ("index", Int(0, MAX_BLOB_CHUNKS - 1)),
    ),
    _contract(
        "avatar", "policy_applied", NoneValue(), ("version", VERSION), ("ok", Bool()), ("detail", Text())
    ),
    _contract(
        "avatar",
        "ship_log_batch",
        Int(0, MAX_LOG_BATCH_RECORDS),  # records newly stored (a re-sent record counts 0)
        ("segment", Int()),
        ("first_seq", Int()),
        (
            "records",
            ListOf(
                Bytes(MAX_LOG_RECORD_BYTES), MAX_LOG_BATCH_RECORDS, 1, max_total_bytes=MAX_MESSAGE_BYTES
            ),
        ),
    ),
    _contract("mind", "ping", NoneValue()),
    _contract("mind", "policy_changed", NoneValue(), ("version", VERSION)),
    _contract("mind", "task", Text(), ("task", TASK_NAME)),
    # The TLS inspection CA, synced like a policy version (added after version 1 of the contract:
    # a master without these methods answers with an error and the slave carries on without).
    _contract("avatar", "inspection_ca_fingerprint", CA_FINGERPRINT),
    _contract("avatar", "inspection_ca", INSPECTION_CA),
    _contract("mind", "inspection_ca_changed", NoneValue(), ("fingerprint", CA_FINGERPRINT)),
    # A version as the sections that changed since the version `base` (the policy digest's
    # SHA-256) that the slave runs; empty when the master has no such change at hand (added after
    # version 1 of the contract: a slave that gets an error or nothing fetches the whole version).
    _contract("avatar", "policy_change", Bytes(MAX_CHUNK_BYTES), ("version", VERSION), ("base", DIGEST)),
    # A log batch as its spool lines joined by newlines: one string for Banana to decode instead
    # of one per record (Banana copies the rest of its buffer after every string it reads, which
    # made a 500-record list cost about 7 µs a record on the master's reactor thread). Added after
    # version 1 of the contract: a slave falls back to ship_log_batch when the master lacks it.
    _contract(
        "avatar",
        "ship_log_lines",
        Int(0, MAX_LOG_BATCH_RECORDS),  # records newly stored (a re-sent record counts 0)
        ("segment", Int()),
        ("first_seq", Int()),
        ("lines", Bytes(MAX_LOG_LINES_BYTES)),
    ),
]

CONTRACTS: dict[str, dict[str, MethodContract]] = {}
for _c in _ALL:
    CONTRACTS.setdefault(_c.interface, {})[_c.name] = _c
del _c


def contract(interface: str, method: str) -> MethodContract:
    try:
        return CONTRACTS[interface][method]
    except KeyError:
        raise WireError(f"{interface} has no remote method {method[:80]!r}") from None


def check_args(
    interface: str, method: str, args: Sequence[object], kwargs: Mapping[str, object]
) -> tuple[object, ...]:
    """Check a call's arguments against the contract; returns them positionally, in order."""
    return contract(interface, method).check_args(args, kwargs)


def check_result(interface: str, method: str, value: object) -> object:
    """Check what a remote method answered (the caller's side); returns it unchanged."""
    return contract(interface, method).check_result(value)


F = TypeVar("F", bound=Callable[..., Any])

_REMOTE_PREFIXES = ("remote_", "perspective_", "view_")


def checked(interface: str) -> Callable[[F], F]:
    """Decorate a PB method (``remote_x`` / ``perspective_x``) so its arguments are checked
    against the contract of ``interface.x`` before the body runs."""

    def decorate(fn: F) -> F:
        name = fn.__name__
        for prefix in _REMOTE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        method = contract(interface, name)

        @functools.wraps(fn)
        def wrapper(self: object, *args: object, **kwargs: object) -> Any:
            return fn(self, *method.check_args(args, kwargs))

        return wrapper  # type: ignore[return-value]

    return decorate


def join_log_lines(records: Sequence[bytes]) -> bytes | None:
    """The `lines` argument of ship_log_lines for a batch, or None when the batch cannot travel so
    (a record holding a newline, which a spool never writes, or too many bytes in all)."""
    lines = b"\n".join(records)
    if not records or len(records) > MAX_LOG_BATCH_RECORDS or len(lines) > MAX_LOG_LINES_BYTES:
        return None
    if lines.count(b"\n") != len(records) - 1:
        return None
    return lines


def split_log_lines(lines: bytes) -> list[bytes]:
    """The records of a ship_log_lines batch, held to ship_log_batch's limits (WireError)."""
    records = lines.split(b"\n")
    if len(records) > MAX_LOG_BATCH_RECORDS:
        raise WireError(f"avatar.ship_log_lines: 'lines' holds {len(records)} records, more than {MAX_LOG_BATCH_RECORDS}")
    if len(lines) - len(records) + 1 > MAX_MESSAGE_BYTES:
        raise WireError(f"avatar.ship_log_lines: 'lines' holds more than {MAX_MESSAGE_BYTES} bytes of records")
    if max(map(len, records)) > MAX_LOG_RECORD_BYTES:
        raise WireError(f"avatar.ship_log_lines: a record of 'lines' is more than {MAX_LOG_RECORD_BYTES} bytes")
    return records


# --- chunked blobs -----------------------------------------------------------------------------


@attrs.frozen
class BlobManifest:
    """What the receiver needs to ask for every chunk and to check the reassembled blob."""

    size: int
    sha256: bytes
    chunk_size: int
    chunks: int

    def to_wire(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_wire(cls, value: Mapping[str, object], where: str = "manifest") -> BlobManifest:
        """Check a received manifest (extra keys such as a policy's ``version`` are ignored)."""
        if type(value) is not dict:
            raise WireError(f"{where} must be a dict, not {_type_name(value)}")
        Record(BLOB_MANIFEST_FIELDS).check({k: value[k] for k in BLOB_MANIFEST_FIELDS if k in value}, where)
        manifest = cls(**{k: value[k] for k in BLOB_MANIFEST_FIELDS})  # type: ignore[arg-type]
        expected = -(-manifest.size // manifest.chunk_size)
        if manifest.chunks != expected:
            raise WireError(
                f"{where} says {manifest.chunks} chunks, but {manifest.size} bytes in chunks of "
                f"{manifest.chunk_size} make {expected}"
            )
        return manifest


def split_blob(blob: bytes, chunk_size: int = MAX_CHUNK_BYTES) -> tuple[BlobManifest, list[bytes]]:
    """Cut `blob` into chunks of `chunk_size` bytes (the last one shorter; none for b"")."""
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, not {chunk_size}")
    if len(blob) > MAX_BLOB_BYTES:
        raise ValueError(f"a blob of {len(blob)} bytes is larger than the {MAX_BLOB_BYTES} bytes allowed")
    view = memoryview(blob)
    chunks = [bytes(view[i : i + chunk_size]) for i in range(0, len(blob), chunk_size)]
    return BlobManifest(len(blob), hashlib.sha256(blob).digest(), chunk_size, len(chunks)), chunks


class BlobAssembler:
    """Collects the chunks of one blob in any order and hands out the blob once its digest checks.

    A chunk of the wrong length, an index out of range or a chunk that differs from one already
    received for the same index raises `WireError`; receiving the same chunk twice is harmless.
    """

    def __init__(self, manifest: BlobManifest) -> None:
        self.manifest = manifest
        self._chunks: dict[int, bytes] = {}

    def expected_length(self, index: int) -> int:
        m = self.manifest
        if index == m.chunks - 1:
            return m.size - index * m.chunk_size
        return m.chunk_size

    def add(self, index: int, chunk: bytes) -> None:
        if type(index) is not int or not 0 <= index < self.manifest.chunks:
            raise WireError(f"chunk index {index!r} is outside 0..{self.manifest.chunks - 1}")
        Bytes(MAX_CHUNK_BYTES).check(chunk, f"chunk {index}")
        if len(chunk) != self.expected_length(index):
            raise WireError(f"chunk {index} is {len(chunk)} bytes, expected {self.expected_length(index)}")
        previous = self._chunks.get(index)
        if previous is not None and previous != chunk:
            raise WireError(f"chunk {index} arrived twice with different content")
        self._chunks[index] = chunk

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.chunks) if i not in self._chunks]

    @property
    def complete(self) -> bool:
        return len(self._chunks) == self.manifest.chunks

    def result(self) -> bytes:
        """The reassembled blob; raises `WireError` if chunks are missing or the digest differs."""
        missing = self.missing()
        if missing:
            raise WireError(f"{len(missing)} chunks are still missing (first: {missing[0]})")
        blob = b"".join(self._chunks[i] for i in range(self.manifest.chunks))
        if hashlib.sha256(blob).digest() != self.manifest.sha256:
            raise WireError("the reassembled blob does not match its SHA-256 digest")
        return blob


__all__ = [
    "ALPN_CONTROL_PLANE",
    "ALPN_HTTP1",
    "BANANA_SIZE_LIMIT",
    "CONTRACTS",
    "MAX_BLOB_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT",
    "NONCE_BYTES",
    "PROOF_BYTES",
    "PROTOCOL_VERSION",
    "BlobAssembler",
    "BlobManifest",
    "MethodContract",
    "WireError",
    "check_args",
    "check_result",
    "checked",
    "contract",
    "split_blob",
]
