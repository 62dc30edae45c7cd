"""Proxy authentication: exempt networks, the credentials cache, and the hash tool."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import argon2
import pytest

from safesquid_tw.policy import hashpw
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.compiled import CompiledPolicy
from safesquid_tw.policy.model import MISS, Identity

_CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE_HASH = _CHEAP.hash("alice-pw")
AB_HASH = _CHEAP.hash("c")
A_HASH = _CHEAP.hash("x")


def doc(enabled: bool = True, users: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": "deny"},
        "authentication": {"enabled": enabled, "realm": "corp proxy", "exempt_networks": ["127.0.0.0/8", "::1",
                                                                                           "10.20.0.0/16"]},
        "groups": [{"name": "staff"}, {"name": "admins"}],
        "users": users if users is not None else [
            {"name": "alice", "password_hash": ALICE_HASH, "groups": ["staff"]},
            {"name": "ab", "password_hash": AB_HASH},
            {"name": "a", "password_hash": A_HASH},
        ],
    }


def compiled(**kwargs: Any) -> CompiledPolicy:
    return policy_from_document(doc(**kwargs), 1).compiled


@pytest.mark.parametrize("client, required", [
    ("127.0.0.1", False),
    ("127.9.9.9", False),
    ("::1", False),
    ("::ffff:127.0.0.1", False),
    ("10.20.3.4", False),
    ("10.21.3.4", True),
    ("192.0.2.1", True),
    ("2001:db8::1", True),
    ("not an address", True),
])
def test_auth_required_outside_exempt_networks(client: str, required: bool) -> None:
    policy = compiled()
    assert policy.auth_required(client) is required
    assert (policy.auth_enabled, policy.realm) == (True, "corp proxy")


def test_no_authentication_when_disabled() -> None:
    assert compiled(enabled=False).auth_required("192.0.2.1") is False


def test_verified_credentials_are_cached() -> None:
    policy = compiled()
    assert policy.cached_identity("alice", "alice-pw") is MISS
    identity = policy.verify_credentials("alice", "alice-pw")
    assert identity == Identity("alice", frozenset({"staff"}))
    assert policy.cached_identity("alice", "alice-pw") == identity


@pytest.mark.parametrize("user, password", [
    ("alice", "wrong"),
    ("alice", ""),
    ("alice", "alice-pw "),
    ("alice", "ALICE-PW"),
    ("Alice", "alice-pw"),
    ("nobody", "alice-pw"),
    ("alice", "\udcff"),
])
def test_wrong_credentials_are_refused_even_after_a_success(user: str, password: str) -> None:
    policy = compiled()
    assert policy.verify_credentials("alice", "alice-pw") is not None
    assert policy.cached_identity(user, password) is MISS
    assert policy.verify_credentials(user, password) is None
    # Remembered as a failure, never as a success.
    assert policy.cached_identity(user, password) is None
    assert policy.verify_credentials(user, password) is None
    assert policy.cached_identity("alice", "alice-pw") == Identity("alice", frozenset({"staff"}))


def test_user_and_password_boundary_is_unambiguous() -> None:
    policy = compiled()
    assert policy.verify_credentials("ab", "c") == Identity("ab", frozenset())
    # "a" + "bc" joins to the same characters as "ab" + "c".
    assert policy.cached_identity("a", "bc") is MISS
    assert policy.verify_credentials("a", "bc") is None


def test_cache_holds_no_password() -> None:
    policy = compiled()
    policy.verify_credentials("alice", "alice-pw")
    policy.verify_credentials("alice", "guess-123")
    credentials = policy._credentials
    for table in (credentials._good, credentials._bad):
        for key in table:
            assert isinstance(key, bytes) and len(key) == 32
            assert b"alice-pw" not in key and b"guess-123" not in key


def test_concurrent_verification_gives_each_caller_the_right_answer() -> None:
    policy = compiled()
    attempts = [("alice", "alice-pw"), ("alice", "nope"), ("ab", "c"), ("a", "x"), ("a", "c")] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda pair: policy.verify_credentials(*pair), attempts))
    expected = {("alice", "alice-pw"): "alice", ("ab", "c"): "ab", ("a", "x"): "a"}
    for pair, result in zip(attempts, results):
        assert (result.user if result else None) == expected.get(pair)


def test_verdicts_carry_over_to_a_version_with_the_same_hash() -> None:
    old = compiled()
    old.verify_credentials("alice", "alice-pw")
    old.verify_credentials("ab", "wrong")
    new_users = [
        {"name": "alice", "password_hash": ALICE_HASH, "groups": ["admins"]},  # same hash, other groups
        {"name": "ab", "password_hash": _CHEAP.hash("wrong")},  # password changed
    ]
    new = policy_from_document(doc(users=new_users), 2).compiled
    new.inherit_from(old)
    assert new.cached_identity("alice", "alice-pw") == Identity("alice", frozenset({"admins"}))
    assert new.cached_identity("ab", "wrong") is MISS
    assert new.verify_credentials("ab", "wrong") == Identity("ab", frozenset())


def test_removed_user_loses_cached_access() -> None:
    old = compiled()
    old.verify_credentials("alice", "alice-pw")
    new = policy_from_document(doc(users=[]), 2).compiled
    new.inherit_from(old)
    assert new.cached_identity("alice", "alice-pw") is MISS
    assert new.verify_credentials("alice", "alice-pw") is None


def test_identity_lookup_without_password() -> None:
    policy = compiled()
    assert policy.identity("alice") == Identity("alice", frozenset({"staff"}))
    assert policy.identity("nobody") is None


# -- hashpw --------------------------------------------------------------------------------------


def test_hashpw_prints_a_verifiable_argon2id_hash() -> None:
    out = io.StringIO()
    assert hashpw.main([], stdin=io.StringIO("s3cret pass\n"), stdout=out) == 0
    printed = out.getvalue().strip()
    assert printed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert argon2.PasswordHasher().verify(printed, "s3cret pass")
    users = [{"name": "carol", "password_hash": printed}]
    policy = policy_from_document(doc(users=users), 1).compiled
    assert policy.verify_credentials("carol", "s3cret pass") == Identity("carol", frozenset())


def test_hashpw_refuses_an_empty_password(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert hashpw.main([], stdin=io.StringIO(""), stdout=out) == 1
    assert out.getvalue() == ""
    assert "empty" in capsys.readouterr().err
