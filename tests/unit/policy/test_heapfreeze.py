"""The running policy is frozen out of the garbage collector after each swap, and that leaks
nothing: replaced versions are freed by reference counting alone (no reference cycles), also
while frozen, and a frozen heap that grows too much is collected again."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest

from safesquid_tw.policy.codec import digest
from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.heapfreeze import HeapFreezer, freeze_after_swaps
from safesquid_tw.policy.incremental import apply_sections
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.policy.validate import validate_document


def document(comment: str = "", domains: int = 500, extra: str = "") -> dict:
    return validate_document({
        "format": "safesquid-policy/1", "comment": comment,
        "categories": {"games": {"domains": [f"site{i}.games.test" for i in range(domains)] + ([extra] if extra else [])},
                       "news": {"domains": ["*.paper.test", "news.test"]}},
        "applications": [{"name": "chat", "hosts": ["chat.test"], "paths": ["/api/*"]}],
        "access": {"default_action": "allow", "rules": [
            {"name": "no-games", "action": "deny", "categories": ["games"]},
            {"name": "no-chat", "action": "deny", "applications": ["chat"]},
            {"name": "ads", "action": "deny", "url_patterns": ["*/ads/*"]},
            {"name": "blocked", "action": "deny", "domains": ["blocked.test", "*.evil.test"]}]}})


def compiled_version(number: int, doc: dict, previous: Policy | None = None) -> Policy:
    return Policy(version=number, digest=digest(doc), document=doc,
                  compiled=compile_policy(doc, previous.compiled if previous else None))


@pytest.fixture
def collector_off():
    """The collector off (as while a node's policy job runs): only reference counting frees."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def test_replaced_versions_are_freed_by_reference_counting_alone(collector_off):
    first = compiled_version(1, document("one"))
    watched = [weakref.ref(first), weakref.ref(first.compiled)]
    # A change of one small section (the compile reuses the rest), of the big one, and a whole
    # version compiled from nothing: each replaced version must go when nothing holds it.
    second_doc = apply_sections(first.document, {"comment": "two"}, [])
    current = compiled_version(2, second_doc, first)
    del first
    watched += [weakref.ref(current), weakref.ref(current.compiled)]
    third_doc = apply_sections(current.document, {"categories": document(extra="new.test")["categories"]}, [])
    current = compiled_version(3, third_doc, current)
    watched += [weakref.ref(current), weakref.ref(current.compiled)]
    current = compiled_version(4, copy.deepcopy(current.document))
    assert [ref() is None for ref in watched] == [True] * len(watched)


def test_a_store_keeps_no_replaced_version_alive(tmp_path: Path, collector_off):
    store = PolicyStore(tmp_path)
    store.apply_document(document("v1"), source="test")
    watched = [weakref.ref(store.current), weakref.ref(store.current.compiled)]
    for n in range(2, 6):
        store.apply_document(document(f"v{n}", extra=f"x{n}.test" if n % 2 else ""), source="test")
    assert store.current.version == 5
    assert [ref() is None for ref in watched] == [True, True]


def test_a_frozen_version_is_still_freed_when_replaced():
    first = compiled_version(1, document("one"))
    watched = weakref.ref(first.compiled)
    gc.freeze()
    try:
        current = compiled_version(2, apply_sections(first.document, {"comment": "two"}, []), first)
        del first
        assert watched() is None and current.version == 2
    finally:
        gc.unfreeze()


class FakeCollector:
    """Records what the freezer asks of the collector; `resident` stands for the process's memory."""

    def __init__(self, resident: int = 100_000_000) -> None:
        self.resident = resident
        self.calls: list[str] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


def freezer_with(fake: FakeCollector, **kwargs) -> HeapFreezer:
    return HeapFreezer(fake, memory=lambda: fake.resident, **kwargs)


def test_the_first_swap_collects_once_then_swaps_only_freeze():
    fake = FakeCollector(resident=100_000_000)
    freezer = freezer_with(fake, growth=1.5, margin=10_000_000)
    freezer.version_swapped()
    assert fake.calls == ["unfreeze", "collect", "freeze"]
    assert freezer.baseline == 100_000_000 and freezer.limit == 160_000_000
    for n in range(5):
        fake.resident += 5_000_000  # grows, within the limit
        freezer.version_swapped()
    assert fake.calls[3:] == ["freeze"] * 5
    assert freezer.full_collections == 1 and freezer.freezes == 6


def test_a_process_grown_past_its_limit_collects_the_frozen_heap_again():
    fake = FakeCollector(resident=100_000_000)
    freezer = freezer_with(fake, growth=1.5, margin=10_000_000)
    freezer.version_swapped()
    fake.resident = 170_000_000  # garbage cycles frozen with versions: never freed while frozen
    freezer.version_swapped()
    assert fake.calls[-3:] == ["unfreeze", "collect", "freeze"]
    assert freezer.full_collections == 2 and freezer.baseline == 170_000_000
    assert freezer.stats()["limit"] == 265_000_000


def test_the_resident_memory_is_read_cheaply():
    from safesquid_tw.policy.heapfreeze import resident_bytes

    assert resident_bytes() > 1_000_000


def test_the_real_collector_skips_what_was_frozen():
    marker = [object()]  # a tracked container made before the swap
    freezer = HeapFreezer()
    try:
        freezer.version_swapped()
        assert gc.get_freeze_count() > 0 and freezer.baseline > 0
        assert not any(obj is marker for obj in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(obj is marker for obj in gc.get_objects())


def test_a_store_freezes_after_every_swap_and_at_once_when_it_runs_a_version(tmp_path: Path):
    store = PolicyStore(tmp_path)
    store.apply_document(document("v1"), source="test")
    fake = FakeCollector()
    freezer = freeze_after_swaps(store, freezer_with(fake))
    assert freezer.full_collections == 1  # the version loaded while the node was built
    store.apply_document(document("v2"), source="test")
    store.apply_document(document("v2"), source="test")  # the same document: no swap
    assert fake.calls == ["unfreeze", "collect", "freeze", "freeze"]
