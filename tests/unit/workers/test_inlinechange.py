"""Which changes a worker compiles on its reactor thread: small changes only, counted cheaply."""

from __future__ import annotations

from safesquid_tw.workers.inlinechange import INLINE_ITEMS, compiles_inline


def change(changed: dict, removed: list | None = None) -> dict:
    return {"t": "policy", "version": 2, "digest": "d2", "base": "d1", "changed": changed, "removed": removed or []}


def test_a_comment_or_a_small_section_compiles_inline():
    assert compiles_inline(change({"comment": "second"}))
    assert compiles_inline(change({"applications": [{"name": "chat", "hosts": ["chat.test"]}]}, ["dlp"]))
    assert compiles_inline(change({}, ["comment"]))


def test_a_whole_version_or_a_frame_for_the_thread_never_does():
    assert not compiles_inline({"t": "policy", "version": 2, "digest": "d2", "doc": {"comment": "x"}})
    assert not compiles_inline({"t": "policy", "frame": b"{}"})


def test_a_big_change_goes_to_the_thread_and_counting_it_stops_early():
    rules = [{"name": f"r{i}", "action": "deny", "domains": [f"d{i}.test"]} for i in range(1000)]
    assert not compiles_inline(change({"access": {"default_action": "allow", "rules": rules}}))
    assert not compiles_inline(change({"categories": {"big": {"domains": ["x.test"] * 100_000}}}))
    assert not compiles_inline(change({"comment": "x"}, ["s"] * (INLINE_ITEMS + 1)))
    at_the_limit = {"c": ["x.test"] * (INLINE_ITEMS - 3)}  # the dict, the mapping, the list: 3 more
    assert compiles_inline(change(at_the_limit))
    assert not compiles_inline(change({"c": ["x.test"] * (INLINE_ITEMS - 2)}))
