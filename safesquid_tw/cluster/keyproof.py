"""Mutual proof of the cluster's activation key, bound to one TLS connection.

Master and slaves share the activation key; it never crosses the wire, and nothing that does
can be replayed. The exchange, on the control plane inside TLS:

1. slave -> master  ``hello(protocol, product, node, slave_nonce)``
2. master -> slave  ``{"protocol", "product", "nonce": master_nonce}``, after checking versions
3. slave -> master  ``prove(slave_proof, mind)``
4. master -> slave  ``{"proof": master_proof, "avatar"}``, only if the slave's proof checked

Each proof is HMAC-SHA256, under a key derived from the activation key, over a transcript of both
nonces, the slave's name, both versions and the connection's *channel binding* (the TLS exporter
value plus the master's key fingerprint, see `tlsconfig.channel_binding`). A recorded exchange is
useless on any other connection, because its exporter value differs; a relay between two TLS
connections fails for the same reason. The labels differ by direction, so one side's proof never
serves as the other's. The slave proves first: the master is reachable by anyone on the network
and so must not hand out anything computed from the key before its peer has shown it has the key.

The HMAC key comes from Argon2id over the activation key, so an observer who somehow obtained a
transcript and proof (a spoofed master on first contact, say) pays a memory-hard computation per
guessed activation key.

Pure module: no Twisted import, tested by tables; the caller supplies the channel binding.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import struct
from typing import Callable

import attrs
from argon2.low_level import Type, hash_secret_raw

from safesquid_tw.cluster.wire import NONCE_BYTES, PROOF_BYTES, PROTOCOL_VERSION, check_args, check_result

# Part of the wire contract: every node must derive the same key from the same activation key.
KDF_SALT = b"safesquid-cluster-key/1"
KDF_TIME_COST = 2
KDF_MEMORY_KIB = 19 * 1024
KDF_PARALLELISM = 1
MIN_CHANNEL_BINDING_BYTES = 32

_SLAVE_LABEL = b"safesquid-cluster/1 slave proof"
_MASTER_LABEL = b"safesquid-cluster/1 master proof"
_RELEASE = re.compile(r"(\d+)\.(\d+)")


class KeyProofFailed(Exception):
    """The peer does not know the activation key, or broke the order of the exchange."""


class IncompatibleVersion(Exception):
    """Master and slave run releases that cannot work together; the message names both."""


@attrs.frozen(repr=False)
class ClusterKey:
    """The HMAC key derived from the activation key (its repr never shows it)."""

    secret: bytes

    @classmethod
    def from_activation_key(cls, activation_key: str) -> ClusterKey:
        """Derive the key (about 50 ms and 19 MiB of memory: do it once per process)."""
        if not activation_key:
            raise ValueError("the activation key is empty")
        secret = hash_secret_raw(
            activation_key.encode("utf-8"),
            KDF_SALT,
            time_cost=KDF_TIME_COST,
            memory_cost=KDF_MEMORY_KIB,
            parallelism=KDF_PARALLELISM,
            hash_len=32,
            type=Type.ID,
        )
        return cls(secret)

    def __repr__(self) -> str:
        return "ClusterKey(<secret>)"


@attrs.frozen
class NodeVersion:
    product: str
    protocol: int = PROTOCOL_VERSION

    def __str__(self) -> str:
        return f"safesquid-tw {self.product} (cluster protocol {self.protocol})"


def _release(product: str) -> tuple[int, int] | str:
    m = _RELEASE.match(product)
    return (int(m.group(1)), int(m.group(2))) if m else product


def check_version_compatibility(master: NodeVersion, slave: NodeVersion, slave_name: str = "") -> None:
    """Raise `IncompatibleVersion` unless both run the same cluster protocol and the same
    major.minor release (patch releases mix freely)."""
    if master.protocol == slave.protocol and _release(master.product) == _release(slave.product):
        return
    who = f"slave {slave_name!r}" if slave_name else "the slave"
    raise IncompatibleVersion(
        f"version mismatch: the master runs {master}, {who} runs {slave}; "
        "run the same release on every node of the cluster"
    )


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


@attrs.frozen
class Transcript:
    """Everything both proofs cover; both sides build it from what they sent and received."""

    channel_binding: bytes
    slave_name: str
    slave_version: NodeVersion
    master_version: NodeVersion
    slave_nonce: bytes
    master_nonce: bytes

    def encode(self) -> bytes:
        # Length-prefixed fields: no two different transcripts encode alike.
        fields = (
            self.channel_binding,
            self.slave_name.encode("utf-8"),
            self.slave_version.product.encode("utf-8"),
            str(self.slave_version.protocol).encode("ascii"),
            self.master_version.product.encode("utf-8"),
            str(self.master_version.protocol).encode("ascii"),
            self.slave_nonce,
            self.master_nonce,
        )
        return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def make_proof(key: ClusterKey, role: str, transcript: Transcript) -> bytes:
    """The proof that `role` ("slave" or "master") knows the key, for this transcript."""
    label = {"slave": _SLAVE_LABEL, "master": _MASTER_LABEL}[role]
    return hmac.new(key.secret, label + b"\0" + transcript.encode(), hashlib.sha256).digest()


def proofs_match(expected: bytes, received: object) -> bool:
    """Constant-time comparison; anything but bytes of the right length is simply a mismatch."""
    if type(received) is not bytes or len(received) != PROOF_BYTES:
        return False
    return hmac.compare_digest(expected, received)


def _check_binding(channel_binding: bytes) -> None:
    if len(channel_binding) < MIN_CHANNEL_BINDING_BYTES:
        raise ValueError("a key proof needs the connection's channel binding (at least 32 bytes)")


class MasterKeyProof:
    """The master's side of one connection's exchange. One attempt: any failure spends it."""

    def __init__(
        self,
        key: ClusterKey,
        version: NodeVersion,
        channel_binding: bytes,
        nonce_source: Callable[[], bytes] = new_nonce,
    ) -> None:
        _check_binding(channel_binding)
        self._key = key
        self._version = version
        self._binding = channel_binding
        self._nonce_source = nonce_source
        self._transcript: Transcript | None = None
        self._state = "hello"
        self.slave_name: str | None = None

    @property
    def authenticated(self) -> bool:
        return self._state == "done"

    def challenge(self, protocol: int, product: str, node: str, nonce: bytes) -> dict[str, object]:
        """Answer ``hello``: check versions, remember the slave's nonce, send ours."""
        if self._state != "hello":
            self._state = "spent"
            raise KeyProofFailed("hello may only be sent once, first")
        self._state = "spent"
        check_args("gate", "hello", (protocol, product, node, nonce), {})
        slave_version = NodeVersion(product, protocol)
        check_version_compatibility(self._version, slave_version, node)
        master_nonce = self._nonce_source()
        self._transcript = Transcript(
            self._binding, node, slave_version, self._version, nonce, master_nonce
        )
        self.slave_name = node
        self._state = "prove"
        return {"protocol": self._version.protocol, "product": self._version.product, "nonce": master_nonce}

    def verify(self, proof: bytes) -> bytes:
        """Check the slave's proof; returns the master's proof for the slave to check in turn."""
        if self._state != "prove" or self._transcript is None:
            self._state = "spent"
            raise KeyProofFailed("prove must follow one hello, once")
        self._state = "spent"
        if not proofs_match(make_proof(self._key, "slave", self._transcript), proof):
            raise KeyProofFailed(
                f"slave {self.slave_name!r} did not prove the activation key: "
                "its activation key differs from the master's"
            )
        self._state = "done"
        return make_proof(self._key, "master", self._transcript)


class SlaveKeyProof:
    """The slave's side of one connection's exchange."""

    def __init__(
        self,
        key: ClusterKey,
        version: NodeVersion,
        node_name: str,
        channel_binding: bytes,
        nonce_source: Callable[[], bytes] = new_nonce,
    ) -> None:
        _check_binding(channel_binding)
        self._key = key
        self._version = version
        self._node_name = node_name
        self._binding = channel_binding
        self._nonce = nonce_source()
        self._transcript: Transcript | None = None
        self._state = "challenge"

    @property
    def authenticated(self) -> bool:
        """True once the master proved it knows the key too."""
        return self._state == "done"

    def hello_args(self) -> tuple[int, str, str, bytes]:
        """The arguments of ``gate.hello``."""
        return (self._version.protocol, self._version.product, self._node_name, self._nonce)

    def answer(self, challenge: dict[str, object]) -> bytes:
        """Check the master's versions and return this slave's proof (``gate.prove``'s first
        argument). `challenge` is what ``hello`` returned; it is checked against the contract."""
        if self._state != "challenge":
            self._state = "spent"
            raise KeyProofFailed("the master's challenge may only be answered once")
        self._state = "spent"
        check_result("gate", "hello", challenge)
        master_version = NodeVersion(challenge["product"], challenge["protocol"])  # type: ignore[arg-type]
        check_version_compatibility(master_version, self._version, self._node_name)
        self._transcript = Transcript(
            self._binding,
            self._node_name,
            self._version,
            master_version,
            self._nonce,
            challenge["nonce"],  # type: ignore[arg-type]
        )
        self._state = "verify"
        return make_proof(self._key, "slave", self._transcript)

    def verify_master(self, proof: bytes) -> None:
        """Check the master's proof; raises `KeyProofFailed` if the master does not know the key."""
        if self._state != "verify" or self._transcript is None:
            self._state = "spent"
            raise KeyProofFailed("the master's proof arrived out of order")
        self._state = "spent"
        if not proofs_match(make_proof(self._key, "master", self._transcript), proof):
            raise KeyProofFailed(
                "the master did not prove the activation key: it is not this cluster's master "
                "(or its activation key differs)"
            )
        self._state = "done"


__all__ = [
    "ClusterKey",
    "IncompatibleVersion",
    "KeyProofFailed",
    "MasterKeyProof",
    "NodeVersion",
    "SlaveKeyProof",
    "Transcript",
    "check_version_compatibility",
    "make_proof",
    "new_nonce",
    "proofs_match",
]
