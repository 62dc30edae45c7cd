"""Which policy changes a worker compiles on its reactor thread instead of handing them to a thread.

Handing a version to the compiling thread costs the worker's reactor more than a small change's
compile does. The thread has to be woken, the GIL passes to it and back (at least twice, and
then twice more for the thread that frees the replaced version), and each handover has the
reactor wait for a thread that is not running when the other processes of the node, which take
the same version at the same moment, hold both cores. A change of the comment or of one small
section compiles in 0.05 to 0.3 ms (`policy/incremental.py` reuses every other section), and the
version it replaces is, but for that section, the same objects as the new one, so freeing it is
as small. Measured in one process that answers a ping every 5 ms while such versions arrive
every 0.15 s, on the shared 2-core machine at load 5 to 7: ping p99 0.2 to 7.8 ms (maximum up to
88 ms) through the thread, 0.2 to 2.2 ms (maximum 1 to 6 ms) inline; at load 12 the machine's
own waits hid the difference (`bench/worker_apply_bench.py`, `bench/README.rst`).

A change is compiled inline when it is small: it came as a change (not a whole version, not a
frame decoded in the thread) and its changed and removed sections hold at most `INLINE_ITEMS`
values in all (counted with an early stop, so the count itself costs at most that many steps).
A bigger one (1000 rules are about 5,000 values; 100,000 domains arrive as a large frame
anyway) still goes to the thread, where its milliseconds of compiling share the GIL with the
reactor in 0.1 ms slices.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

INLINE_ITEMS = 2000


def compiles_inline(message: dict[str, Any], limit: int = INLINE_ITEMS) -> bool:
    """True for a change small enough to compile on the reactor thread (see the module's doc)."""
    if "changed" not in message or "doc" in message or "frame" in message:
        return False
    return _at_most(limit, message.get("changed"), message.get("removed"))


def _at_most(limit: int, *values: Any) -> bool:
    """Whether the values hold at most `limit` leaves and containers in all; stops counting early."""
    stack = list(values)
    seen = 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return False
        room = limit - seen - len(stack) + 1  # never stack more than could still fit
        if isinstance(value, dict):
            stack.extend(islice(value.values(), max(room, 0)))
            seen += max(len(value) - max(room, 0), 0)
        elif isinstance(value, (list, tuple)):
            stack.extend(islice(value, max(room, 0)))
            seen += max(len(value) - max(room, 0), 0)
    return seen <= limit


__all__ = ["INLINE_ITEMS", "compiles_inline"]
