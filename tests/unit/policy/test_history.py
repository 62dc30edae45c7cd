"""policy/history.py: every applied version kept with who, when and why; rollback; a damaged
history file set aside and reported."""

from __future__ import annotations

from safesquid_tw.policy.history import PolicyHistory
from safesquid_tw.policy.store import PolicyStore


def doc(default: str) -> dict:
    return {"format": "safesquid-policy/1", "access": {"default_action": default, "rules": []}}


def test_versions_are_kept_and_a_rollback_is_a_new_version(tmp_path):
    store = PolicyStore(tmp_path)
    history = PolicyHistory(store, tmp_path, clock=lambda: 1000.0)
    history.apply(doc("allow"), by="alice", comment="first")
    history.apply(doc("deny"), by="bob", comment="second")
    assert [(i.version, i.applied_by, i.comment) for i in history.versions()] == [(2, "bob", "second"),
                                                                                    (1, "alice", "first")]
    policy = history.rollback(1, by="carol")
    assert policy.version == 3 and history.document(3) == history.document(1)
    assert history.info(3).source == "rollback 1"
    assert "deny" in history.diff(1, 2)


def test_a_damaged_history_file_is_set_aside_and_reported(tmp_path):
    store = PolicyStore(tmp_path)
    PolicyHistory(store, tmp_path).apply(doc("allow"), by="a", comment="")
    (tmp_path / "policy" / "history" / "00000001.json").write_text("{not json")
    again = PolicyHistory(PolicyStore(tmp_path), tmp_path)
    assert again.versions() == [] and len(again.problems) == 1
    assert (tmp_path / "policy" / "history" / "00000001.json.corrupt").exists()
