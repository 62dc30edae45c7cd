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
holds it (a replaced version is), but garbage that only the collector frees (a reference cycle)
is never found while frozen: cyclic garbage that was not collected yet when a version was frozen,
and objects alive then (a connection's protocol and transport) that end up in a cycle later. A
compiled policy holds no reference cycle (tests/unit/policy/test_heapfreeze.py replaces versions
with the collector off and checks that the old ones are freed), so what can pile up is what
requests leave, and it is bounded by memory: the first freeze (start-up, before the node serves)
follows one full collection, and the process's resident memory then is the baseline; when a later
swap finds it grown past `GROWTH` times the baseline plus `MARGIN_BYTES`, it unfreezes, collects
once (one pause of the old kind, rarely) and freezes again with a new baseline. Memory, not
`gc.get_freeze_count()`: that one walks every frozen object (13 ms for 300,000 of them), on each
swap, in every process.

One freezer per process (the collector is per process): a node's policy store calls it as a swap
observer, a worker process after it installs a version. The `collector` is injectable (the `gc`
module in a node, a fake in tests, where freezing the test runner's heap would hide garbage from
tests that collect it on purpose).
"""

from __future__ import annotations

import gc
import os
import resource
from typing import Any, Callable, Protocol

from twisted.logger import Logger

_log = Logger()

# The process may grow to GROWTH times its resident memory after the last full collection, plus
# MARGIN_BYTES, before the next swap collects the frozen heap again.
GROWTH = 1.5
MARGIN_BYTES = 64 * 1024 * 1024


class Collector(Protocol):
    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...


def resident_bytes() -> int:
    """The process's resident memory: /proc (one small read), else the peak from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HeapFreezer:
    """Freezes the heap after each policy swap; collects it again when the process grew too much.

    Counters (plain attributes, for tests and reports): `freezes`, `full_collections`,
    `baseline` (resident bytes after the last full collection), `last_resident`.
    """

    def __init__(self, collector: Collector = gc, *, memory: Callable[[], int] = resident_bytes,
                 growth: float = GROWTH, margin: int = MARGIN_BYTES) -> None:
        self.collector = collector
        self.memory = memory
        self.growth = growth
        self.margin = margin
        self.baseline: int | None = None
        self.freezes = 0
        self.full_collections = 0
        self.last_resident = 0

    @property
    def limit(self) -> int | None:
        """Resident bytes beyond which the next swap collects (None before the first swap)."""
        if self.baseline is None:
            return None
        return int(self.baseline * self.growth) + self.margin

    def version_swapped(self, _policy: Any = None) -> None:
        """Call right after a version became the running one (a store observer's signature)."""
        limit = self.limit
        self.last_resident = self.memory()
        if limit is None or self.last_resident > limit:
            self._collect_and_freeze(limit)
            return
        self.collector.freeze()
        self.freezes += 1

    def _collect_and_freeze(self, limit: int | None) -> None:
        if limit is not None:
            _log.info("policy heap: {resident} bytes resident (limit {limit}); collecting the frozen heap once",
                      resident=self.last_resident, limit=limit)
        self.collector.unfreeze()
        self.collector.collect()
        self.full_collections += 1
        self.collector.freeze()
        self.freezes += 1
        self.baseline = self.last_resident = self.memory()

    def stats(self) -> dict[str, Any]:
        return {"freezes": self.freezes, "full_collections": self.full_collections,
                "baseline": self.baseline, "resident": self.last_resident, "limit": self.limit}


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


__all__ = ["Collector", "GROWTH", "HeapFreezer", "MARGIN_BYTES", "freeze_after_swaps", "resident_bytes"]
