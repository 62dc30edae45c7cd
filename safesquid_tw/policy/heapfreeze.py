"""Keeping the running policy out of Python's cyclic garbage collector.

A process that holds a big policy (1000 rules, 100,000 domains) pays for it in every full
(generation 2) collection: the collector traverses every entry of the policy's big dicts, lists
and sets, about 50 ms a time on a loaded core (`bench/README.rst`, push-latency section), and it
runs in whichever thread happens to allocate, holding the GIL, so a serving process's reactor
waits that long. Full collections come at start-up, after a whole version is compiled (while the
applier pauses the collector, everything the job allocated piles up in the youngest generation
and is all traversed once the collector runs again), and from time to time while serving (when
the objects that survived two collections grow by a quarter).

`gc.freeze()` right after a version is swapped in moves every tracked object into the permanent
generation, which collections never traverse: the policy, and whatever else lived at that moment
(modules, classes, services), is then skipped by every later collection. Freezing is one splice
of the collector's lists, constant time, so it is cheap enough for the reactor thread.

What freezing costs: a frozen object is still freed by reference counting as soon as nothing
holds it (a replaced version is), but garbage that is only freed by the collector (a reference
cycle) is never found while frozen. A compiled policy holds no reference cycle
(tests/unit/policy/test_heapfreeze.py replaces versions with the collector off and checks that the
old ones are freed), but cyclic garbage that requests left behind and that was not collected yet
when a version was frozen stays. So the growth is bounded: the first freeze (start-up, before the
node serves) follows one full collection and its count is the baseline; when a later swap finds
the frozen count grown past `GROWTH` times the baseline plus `MARGIN`, it unfreezes, collects
once (one pause of the old kind, rarely) and freezes again with a new baseline.

One freezer per process (the collector is per process): a node's policy store calls it as a swap
observer, a worker process after it installs a version. The `collector` is injectable (the `gc`
module in a node, a fake in tests, where freezing the test runner's heap would hide garbage from
tests that collect it on purpose).
"""

from __future__ import annotations

import gc
from typing import Any, Protocol

from twisted.logger import Logger

_log = Logger()

# A frozen heap may grow to GROWTH times its size after the last full collection, plus MARGIN
# objects, before the next swap collects it again.
GROWTH = 2.0
MARGIN = 50_000


class Collector(Protocol):
    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_freeze_count(self) -> int: ...


class HeapFreezer:
    """Freezes the heap after each policy swap; collects it again when the frozen part grew too much.

    Counters (read by tests and /health-style reports): `freezes`, `full_collections`,
    `baseline` (frozen objects after the last full collection), `last_frozen`.
    """

    def __init__(self, collector: Collector = gc, *, growth: float = GROWTH, margin: int = MARGIN) -> None:
        self.collector = collector
        self.growth = growth
        self.margin = margin
        self.baseline: int | None = None
        self.freezes = 0
        self.full_collections = 0
        self.last_frozen = 0

    @property
    def limit(self) -> int | None:
        """Frozen objects beyond which the next swap collects (None before the first one)."""
        if self.baseline is None:
            return None
        return int(self.baseline * self.growth) + self.margin

    def version_swapped(self, _policy: Any = None) -> None:
        """Call right after a version became the running one (a store observer's signature)."""
        limit = self.limit
        frozen = self.collector.get_freeze_count()
        if limit is None or frozen > limit:
            self._collect_and_freeze(frozen, limit)
            return
        self.collector.freeze()
        self.freezes += 1
        self.last_frozen = self.collector.get_freeze_count()

    def _collect_and_freeze(self, frozen: int, limit: int | None) -> None:
        if limit is not None:
            _log.info("policy heap: {frozen} frozen objects (limit {limit}); collecting them once",
                      frozen=frozen, limit=limit)
        self.collector.unfreeze()
        self.collector.collect()
        self.full_collections += 1
        self.collector.freeze()
        self.freezes += 1
        self.baseline = self.last_frozen = self.collector.get_freeze_count()

    def stats(self) -> dict[str, Any]:
        return {"freezes": self.freezes, "full_collections": self.full_collections,
                "baseline": self.baseline, "frozen": self.last_frozen, "limit": self.limit}


def freeze_after_swaps(store: Any, freezer: HeapFreezer | None = None) -> HeapFreezer:
    """Follow a node's policy store: freeze after every swap. Registered last (after the parts
    whose observers build long-lived objects of their own, which are then frozen with the
    version); if the store already runs a version (a cache loaded while the node was built),
    the first freeze, with its one full collection, happens now, before anything listens."""
    freezer = freezer or HeapFreezer()
    store.add_observer(freezer.version_swapped)
    if store.current is not None:
        freezer.version_swapped(store.current)
    return freezer


__all__ = ["Collector", "GROWTH", "HeapFreezer", "MARGIN", "freeze_after_swaps"]
