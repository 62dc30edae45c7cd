"""Versions prepared reusing the sections that did not change give exactly what a full
preparation gives: the same canonical document and digest, the same tables and the same decisions,
also when a section another one refers to changes, and a bad version is still refused."""

from __future__ import annotations

import copy
import json

import pytest

from safesquid_tw.policy.codec import canonical_bytes, digest
from safesquid_tw.policy.compiled import compile_policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.incremental import SectionMemo, apply_sections, changed_sections, json_copy, same_json
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.policy.validate import validate_document


def base_document() -> dict:
    return {
        "format": "safesquid-policy/1",
        "comment": "first",
        "groups": [{"name": "staff"}],
        "users": [],
        "categories": {
            "news": {"domains": ["news.test", "*.paper.test"]},
            "games": {"domains": ["play.test", "*.arcade.test"]},
        },
        "applications": [{"name": "chat", "hosts": ["chat.test"], "paths": ["/api/*"]}],
        "access": {"default_action": "allow", "rules": [
            {"name": "no-games", "action": "deny", "categories": ["games"]},
            {"name": "no-ads", "action": "deny", "url_patterns": ["*/ads/*"]},
            {"name": "no-chat", "action": "deny", "applications": ["chat"]},
            {"name": "blocked", "action": "deny", "domains": ["blocked.test", "*.evil.test"]},
            {"name": "office", "action": "deny", "clients": ["10.9.0.0/16"], "methods": ["DELETE"]},
        ]},
    }


def versions() -> list[dict]:
    """A sequence of documents, each a small change of the one before."""
    docs = [base_document()]

    def next_one(change) -> None:
        doc = copy.deepcopy(docs[-1])
        change(doc)
        docs.append(doc)

    next_one(lambda d: d.update(comment="second"))
    # A category that a rule refers to gains and loses domains.
    next_one(lambda d: d["categories"]["games"]["domains"].extend(["news.test", "*.games2.test"]))
    next_one(lambda d: d["categories"]["games"]["domains"].remove("play.test"))
    # A rule is renamed, another starts referring to news, one is disabled.
    next_one(lambda d: d["access"]["rules"][3].update(name="blocked-renamed"))
    next_one(lambda d: d["access"]["rules"][0].update(categories=["games", "news"]))
    next_one(lambda d: d["access"]["rules"][1].update(enabled=False))
    # The application's signature changes; then a rule changes only the type of a value.
    next_one(lambda d: d["applications"][0].update(paths=["/v2/*"]))
    next_one(lambda d: d["access"]["rules"][4].update(methods=["DELETE", "PUT"]))
    # A category is removed along with the rule that referred to it.
    def drop_games(d: dict) -> None:
        del d["categories"]["games"]
        d["access"]["rules"][0]["categories"] = ["news"]
    next_one(drop_games)
    next_one(lambda d: d.pop("comment"))
    return docs


REQUESTS = [
    RequestFacts(client_ip=client, method=method, scheme="http", host=host, port=80, path=path)
    for client in ("127.0.0.1", "10.9.1.1")
    for method in ("GET", "DELETE", "PUT")
    for host, path in (("news.test", "/"), ("a.paper.test", "/x"), ("play.test", "/"), ("x.arcade.test", "/"),
                       ("www.games2.test", "/"), ("chat.test", "/api/send"), ("chat.test", "/v2/send"),
                       ("blocked.test", "/"), ("a.evil.test", "/"), ("site.test", "/ads/1"),
                       ("site.test", "/"))
]


def outcome(compiled) -> list:
    decisions = [compiled.decide(facts) for facts in REQUESTS]
    return [(d.action, d.rule, d.reason, d.category, d.application) for d in decisions]


def tables(compiled) -> tuple:
    rules = compiled._rules
    return (compiled._categories._by_domain, rule_table_state(rules), compiled.rule_names,
            [(s.name, s.path_regex.pattern if s.path_regex else None) for s in compiled._applications._signatures],
            compiled._applications._exact, compiled._applications._wildcard)


def rule_table_state(table) -> tuple:
    return (table.all_rules, table.needs_check, table.url_mask, table._exact.by_value, table._wildcard.by_value,
            table._categories.by_value, table._categories.unconditioned, table._applications.by_value,
            table._methods.by_value, table.unconditioned_clients,
            [(r.name, r.action, r.reason, r.categories) for r in table.rules])


def test_a_sequence_of_versions_prepared_incrementally_equals_full_preparations(tmp_path):
    store = PolicyStore(tmp_path)
    for number, doc in enumerate(versions(), start=1):
        policy = store.apply_document(doc, source="test")
        assert policy.version == number
        canonical = validate_document(doc)
        full = compile_policy(canonical)
        assert policy.document == canonical and same_json(policy.document, canonical)
        assert policy.digest == digest(canonical)
        assert outcome(policy.compiled) == outcome(full)
        assert tables(policy.compiled) == tables(full)
        # The cache holds the whole document, whatever was reused.
        cached = json.loads(store.cache_path.read_bytes())
        assert cached["policy"] == canonical and cached["digest"] == policy.digest
    assert store.sections.reused > 0


def test_the_off_reactor_path_and_a_slave_taking_bytes_give_the_same_versions(tmp_path):
    master, slave = PolicyStore(tmp_path / "m"), PolicyStore(tmp_path / "s")
    for number, doc in enumerate(versions(), start=1):
        prepared = master.prepare_document(doc, source="api")
        policy = master.commit_prepared(prepared)
        assert prepared.data == canonical_bytes(validate_document(doc))
        taken = slave.commit_prepared(slave.prepare_blob(prepared.data, number))
        assert taken.digest == policy.digest and taken.document == policy.document
        full = compile_policy(validate_document(doc))
        assert outcome(taken.compiled) == outcome(policy.compiled) == outcome(full)
        assert tables(taken.compiled) == tables(full)


def test_unchanged_sections_are_not_compiled_again(tmp_path):
    store = PolicyStore(tmp_path)
    first = store.apply_document(base_document(), source="test")
    second = store.apply_document(dict(base_document(), comment="other"), source="test")
    assert second.compiled._categories is first.compiled._categories
    assert second.compiled._rules is first.compiled._rules
    assert second.document["categories"] is first.document["categories"]
    changed = copy.deepcopy(base_document())
    changed["categories"]["news"]["domains"].append("more.test")
    third = store.apply_document(changed, source="test")
    assert third.compiled._categories is not second.compiled._categories
    assert third.compiled._rules is second.compiled._rules


def test_a_rule_referring_to_a_removed_category_is_refused_though_the_rules_did_not_change(tmp_path):
    store = PolicyStore(tmp_path)
    running = store.apply_document(base_document(), source="test")
    doc = copy.deepcopy(base_document())
    del doc["categories"]["games"]  # access.rules unchanged, but no-games now refers to nothing
    with pytest.raises(PolicyError) as refused:
        store.apply_document(doc, source="test")
    assert "games" in str(refused.value) and "access.rules" in str(refused.value)
    assert store.current is running


def test_a_value_equal_under_python_but_not_as_json_is_checked_again(tmp_path):
    store = PolicyStore(tmp_path)
    store.apply_document(base_document(), source="test")
    doc = copy.deepcopy(base_document())
    doc["access"]["rules"][0]["enabled"] = True
    store.apply_document(doc, source="test")
    doc = copy.deepcopy(doc)
    doc["access"]["rules"][0]["enabled"] = 1  # == True in Python; not a boolean in a policy
    with pytest.raises(PolicyError, match="enabled"):
        store.apply_document(doc, source="test")


def test_a_document_changed_in_place_after_it_was_applied_is_validated_again(tmp_path):
    store = PolicyStore(tmp_path)
    doc = base_document()
    store.apply_document(doc, source="test")
    doc["categories"]["news"]["domains"].append("not a domain")
    with pytest.raises(PolicyError, match="categories.news.domains"):
        store.apply_document(doc, source="test")


def test_a_canonical_document_is_what_validating_it_again_gives():
    # What lets a slave's memo take a canonical section as the input it was made from.
    for doc in versions():
        canonical = validate_document(doc)
        assert same_json(validate_document(canonical), canonical)


def test_same_json_tells_types_and_key_order_apart():
    assert same_json({"a": [1, "x", {"b": True}]}, {"a": [1, "x", {"b": True}]})
    assert not same_json([True], [1])
    assert not same_json([1.0], [1])
    assert not same_json({"a": {"b": 1}}, {"a": {"b": True}})
    assert not same_json({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not same_json(["a"], ["a", "b"])


def test_section_memo_keys_on_the_names_a_section_may_refer_to():
    memo = SectionMemo()
    calls: list = []

    def check(raw):
        calls.append(raw)
        return {"checked": raw}

    first = memo.validate("s", [1, 2], check, frozenset({"x"}))
    assert memo.validate("s", [1, 2], check, frozenset({"x"})) is first
    assert memo.validate("s", [1, 2], check, frozenset({"y"})) is not first
    assert len(calls) == 2


def test_changed_sections_and_apply_sections_rebuild_the_document():
    old = validate_document(base_document())
    new = validate_document(dict(base_document(), comment="x"))
    new.pop("dlp")
    changed, removed = changed_sections(old, new)
    assert changed == {"comment": "x"} and removed == ["dlp"]
    rebuilt = apply_sections(old, changed, removed)
    assert rebuilt == new and rebuilt["categories"] is old["categories"]
    assert json_copy(old) == old and json_copy(old)["categories"] is not old["categories"]


def test_pieces_of_canonical_bytes_and_records_join_to_the_whole_forms():
    from safesquid_tw.policy.canonical_io import (
        canonical_parts_reusing, digest_of_parts, parts_equal, record_bytes, record_parts)

    first = validate_document(base_document())
    parts, kept = canonical_parts_reusing(first, {})
    assert b"".join(parts) == canonical_bytes(first) and digest_of_parts(parts) == digest(first)
    second = dict(first, comment="changed")
    again, _kept = canonical_parts_reusing(second, kept)
    assert b"".join(again) == canonical_bytes(second)
    assert any(piece is kept["categories"][1] for piece in again)  # not serialised again
    assert parts_equal(again, canonical_bytes(second)) and not parts_equal(again, canonical_bytes(first))
    fields = {"version": 3, "digest": digest(first), "source": "master"}
    assert b"".join(record_parts(fields, "policy", b"{}")) == record_bytes(fields, "policy", b"{}")
    assert b"".join(record_parts({}, "policy", b"[]")) == record_bytes({}, "policy", b"[]")


def test_the_sample_policy_changed_section_by_section_prepares_as_a_full_preparation(tmp_path):
    from safesquid_tw.resources import sample_policy_path

    sample = json.loads(open(sample_policy_path(), encoding="utf-8").read())
    assert same_json(validate_document(validate_document(sample)), validate_document(sample))
    store = PolicyStore(tmp_path)
    store.apply_document(sample, source="test")
    for key in [k for k in sample if k != "format"]:
        doc = copy.deepcopy(sample)
        doc.pop(key)  # every section in turn back to its default (or, for access, refused)
        try:
            canonical = validate_document(doc)
        except PolicyError as e:
            with pytest.raises(PolicyError) as refused:
                store.apply_document(doc, source="test")
            assert str(refused.value) == str(e)
            continue
        policy = store.apply_document(doc, source="test")
        assert policy.digest == digest(canonical)
        full = compile_policy(canonical)
        assert outcome(policy.compiled) == outcome(full) and tables(policy.compiled) == tables(full)
        policy = store.apply_document(sample, source="test")
        assert policy.digest == digest(validate_document(sample))
