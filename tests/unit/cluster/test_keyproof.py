"""The mutual proof of the activation key, bound to one connection: no sockets, no clocks."""

from __future__ import annotations

import itertools

import pytest

from safesquid_tw.cluster import wire
from safesquid_tw.cluster.keyproof import (
    ClusterKey,
    IncompatibleVersion,
    KeyProofFailed,
    MasterKeyProof,
    NodeVersion,
    SlaveKeyProof,
    Transcript,
    check_version_compatibility,
    make_proof,
    new_nonce,
    proofs_match,
)

BINDING = b"B" * 64
OTHER_BINDING = b"C" * 64
V = NodeVersion("0.1.0")


@pytest.fixture(scope="module")
def key() -> ClusterKey:
    return ClusterKey.from_activation_key("ACTIVATION-KEY-1234-5678")


@pytest.fixture(scope="module")
def other_key() -> ClusterKey:
    return ClusterKey.from_activation_key("ACTIVATION-KEY-1234-5679")


def exchange(slave: SlaveKeyProof, master: MasterKeyProof) -> None:
    """Run the whole exchange, passing each message through the wire contract as PB would."""
    hello = wire.check_args("gate", "hello", slave.hello_args(), {})
    challenge = wire.check_result("gate", "hello", master.challenge(*hello))
    slave_proof = slave.answer(challenge)  # type: ignore[arg-type]
    master_proof = master.verify(slave_proof)
    slave.verify_master(master_proof)


def test_both_sides_authenticate_with_the_same_key_and_binding(key):
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    master = MasterKeyProof(key, V, BINDING)
    exchange(slave, master)
    assert slave.authenticated and master.authenticated
    assert master.slave_name == "node-a"


def test_key_derivation_is_deterministic_and_secret_stays_out_of_repr(key):
    again = ClusterKey.from_activation_key("ACTIVATION-KEY-1234-5678")
    assert again == key and len(key.secret) == 32
    assert "ACTIVATION" not in repr(key) and key.secret.hex() not in repr(key)
    with pytest.raises(ValueError, match="empty"):
        ClusterKey.from_activation_key("")


def test_a_slave_with_another_key_is_refused_and_learns_nothing(key, other_key):
    slave = SlaveKeyProof(other_key, V, "intruder", BINDING)
    master = MasterKeyProof(key, V, BINDING)
    slave_proof = slave.answer(master.challenge(*slave.hello_args()))
    with pytest.raises(KeyProofFailed, match="'intruder' did not prove the activation key"):
        master.verify(slave_proof)
    assert not master.authenticated
    # One attempt per connection: the spent exchange refuses even a correct proof now.
    with pytest.raises(KeyProofFailed):
        master.verify(slave_proof)


def test_a_master_with_another_key_is_refused_by_the_slave(key, other_key):
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    impostor = MasterKeyProof(other_key, V, BINDING)
    slave_proof = slave.answer(impostor.challenge(*slave.hello_args()))
    # The impostor cannot check the slave's proof, and whatever it sends back fails.
    with pytest.raises(KeyProofFailed):
        impostor.verify(slave_proof)
    forged = make_proof(other_key, "master", Transcript(BINDING, "node-a", V, V, b"x" * 32, b"y" * 32))
    with pytest.raises(KeyProofFailed, match="the master did not prove the activation key"):
        slave.verify_master(forged)
    assert not slave.authenticated


def test_a_recorded_exchange_does_not_replay_on_another_connection(key):
    # Record a complete exchange on connection 1.
    nonces = itertools.cycle([b"s" * 32, b"m" * 32])
    slave1 = SlaveKeyProof(key, V, "node-a", BINDING, nonce_source=lambda: next(nonces))
    master1 = MasterKeyProof(key, V, BINDING, nonce_source=lambda: next(nonces))
    hello = slave1.hello_args()
    challenge = master1.challenge(*hello)
    recorded_slave_proof = slave1.answer(challenge)
    recorded_master_proof = master1.verify(recorded_slave_proof)
    slave1.verify_master(recorded_master_proof)

    # An attacker replays the slave's messages to the master on connection 2 (other binding),
    # even if the master happened to pick the same nonce.
    master2 = MasterKeyProof(key, V, OTHER_BINDING, nonce_source=lambda: b"m" * 32)
    master2.challenge(*hello)
    with pytest.raises(KeyProofFailed):
        master2.verify(recorded_slave_proof)

    # ...or replays the master's answers to a slave on connection 2.
    slave2 = SlaveKeyProof(key, V, "node-a", OTHER_BINDING, nonce_source=lambda: b"s" * 32)
    slave2.answer(challenge)
    with pytest.raises(KeyProofFailed):
        slave2.verify_master(recorded_master_proof)


def test_a_slave_proof_is_never_a_master_proof(key):
    transcript = Transcript(BINDING, "node-a", V, V, b"s" * 32, b"m" * 32)
    assert make_proof(key, "slave", transcript) != make_proof(key, "master", transcript)


@pytest.mark.parametrize(
    "field,value",
    [
        ("channel_binding", OTHER_BINDING),
        ("slave_name", "node-b"),
        ("slave_version", NodeVersion("0.1.1")),
        ("master_version", NodeVersion("0.1.0", 2)),
        ("slave_nonce", b"t" * 32),
        ("master_nonce", b"n" * 32),
    ],
)
def test_every_transcript_field_changes_the_proof(key, field, value):
    import attrs

    base = Transcript(BINDING, "node-a", V, V, b"s" * 32, b"m" * 32)
    changed = attrs.evolve(base, **{field: value})
    assert make_proof(key, "slave", base) != make_proof(key, "slave", changed)


def test_transcript_encoding_is_unambiguous():
    a = Transcript(b"B" * 32, "ab", V, V, b"s" * 32, b"m" * 32)
    b = Transcript(b"B" * 32 + b"\x00\x00\x00\x02a", "b", V, V, b"s" * 32, b"m" * 32)
    assert a.encode() != b.encode()


@pytest.mark.parametrize(
    "received,ok",
    [(b"P" * 32, True), (b"Q" * 32, False), (b"P" * 31, False), ("P" * 32, False), (None, False)],
)
def test_proofs_match_only_exact_bytes(received, ok):
    assert proofs_match(b"P" * 32, received) is ok


def test_nonces_are_fresh_and_sized():
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(n) == wire.NONCE_BYTES for n in nonces)


@pytest.mark.parametrize(
    "master,slave,compatible",
    [
        (NodeVersion("0.1.0"), NodeVersion("0.1.0"), True),
        (NodeVersion("0.1.0"), NodeVersion("0.1.7"), True),
        (NodeVersion("1.2.0rc1"), NodeVersion("1.2.3"), True),
        (NodeVersion("0.1.0"), NodeVersion("0.2.0"), False),
        (NodeVersion("1.0.0"), NodeVersion("0.1.0"), False),
        (NodeVersion("0.1.0", 1), NodeVersion("0.1.0", 2), False),
        (NodeVersion("nightly"), NodeVersion("nightly"), True),
        (NodeVersion("nightly"), NodeVersion("weekly"), False),
    ],
)
def test_version_compatibility(master, slave, compatible):
    if compatible:
        check_version_compatibility(master, slave, "node-a")
    else:
        with pytest.raises(IncompatibleVersion) as excinfo:
            check_version_compatibility(master, slave, "node-a")
        message = str(excinfo.value)
        assert f"the master runs safesquid-tw {master.product} (cluster protocol {master.protocol})" in message
        assert f"slave 'node-a' runs safesquid-tw {slave.product} (cluster protocol {slave.protocol})" in message


def test_master_refuses_an_incompatible_slave_before_sending_a_nonce(key):
    master = MasterKeyProof(key, NodeVersion("0.2.0"), BINDING, nonce_source=lambda: pytest.fail("nonce drawn"))
    with pytest.raises(IncompatibleVersion, match="0.2.0.*0.1.0"):
        master.challenge(1, "0.1.0", "node-a", b"s" * 32)
    with pytest.raises(KeyProofFailed):
        master.verify(b"p" * 32)


def test_slave_refuses_an_incompatible_master(key):
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    with pytest.raises(IncompatibleVersion, match="the master runs safesquid-tw 0.3.0"):
        slave.answer({"protocol": 1, "product": "0.3.0", "nonce": b"m" * 32})


@pytest.mark.parametrize(
    "steps",
    [
        ["verify"],  # proof before hello
        ["challenge", "challenge"],  # hello twice
        ["challenge", "verify", "verify"],  # proof twice (even a good one)
    ],
)
def test_master_enforces_the_order(key, steps):
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    master = MasterKeyProof(key, V, BINDING)
    proof = None
    with pytest.raises(KeyProofFailed):
        for step in steps:
            if step == "challenge":
                challenge = master.challenge(*slave.hello_args())
                proof = slave.answer(challenge) if proof is None else proof
            else:
                master.verify(proof or b"p" * 32)
    assert not master.authenticated


def test_slave_enforces_the_order(key):
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    with pytest.raises(KeyProofFailed, match="out of order"):
        slave.verify_master(b"p" * 32)
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    challenge = {"protocol": 1, "product": "0.1.0", "nonce": b"m" * 32}
    slave.answer(challenge)
    with pytest.raises(KeyProofFailed, match="only be answered once"):
        slave.answer(challenge)


@pytest.mark.parametrize("binding", [b"", b"x" * 31])
def test_an_unbound_exchange_is_refused(key, binding):
    with pytest.raises(ValueError, match="channel binding"):
        MasterKeyProof(key, V, binding)
    with pytest.raises(ValueError, match="channel binding"):
        SlaveKeyProof(key, V, "node-a", binding)


def test_malformed_messages_break_the_contract_on_both_sides(key):
    master = MasterKeyProof(key, V, BINDING)
    with pytest.raises(wire.WireError, match="'nonce'"):
        master.challenge(1, "0.1.0", "node-a", b"short")
    with pytest.raises(KeyProofFailed):  # and the attempt is spent
        master.challenge(1, "0.1.0", "node-a", b"s" * 32)
    slave = SlaveKeyProof(key, V, "node-a", BINDING)
    with pytest.raises(wire.WireError, match="the result of hello"):
        slave.answer({"protocol": "1", "product": "0.1.0", "nonce": b"m" * 32})
