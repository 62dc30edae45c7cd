"""Freeing a replaced policy version a piece at a time, in the policy thread.

When the last reference to a big version goes (100,000 domains: its document, its category
index, its rule tables), CPython frees a few hundred thousand objects in one C call chain that
holds the GIL throughout: about 5 ms on an idle core, several times that on a loaded one, and on
the reactor thread, where the last reference usually goes, every request waits that long. Here
the policy thread takes the old version apart instead: dicts, lists and sets are emptied a few
hundred entries at a time in Python code, so the GIL changes hands between pieces as it does
during any other policy job.

Only what nothing else holds is taken apart. Each container is checked with
`sys.getrefcount` after it was detached from its parent: a request still running under the old
version, a version that inherited part of it, or any other holder keeps its part whole, and it is
freed the ordinary way when that holder lets go. Objects of classes outside the policy package
(directory clients, TLS contexts) are never taken apart, only let go.
"""

from __future__ import annotations

import sys
import time
from typing import Any

PIECE = 256  # entries freed between two chances for the GIL to change hands
WAIT_FOR_OWNERSHIP = 0.2  # seconds to wait for other holders (a request under way) to let go
_OWN_PACKAGE = "safesquid_tw.policy."
_CONTAINERS = (dict, list, set)
# sys.getrefcount of an object that only the loop's variable holds (the call's argument is one more).
_ONLY_OURS = 2


def _is_own_object(obj: Any) -> bool:
    return type(obj).__module__.startswith(_OWN_PACKAGE)


def _attribute_names(obj: Any) -> list[str]:
    names: list[str] = []
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [s for s in slots if s not in ("__weakref__", "__dict__")]
    names += list(getattr(obj, "__dict__", {}))
    return names


def _worth_taking_apart(value: Any) -> bool:
    kind = type(value)
    return (kind in _CONTAINERS and len(value) > 0) or _is_own_object(value)


def release_in_pieces(box: list[Any], *, sleep=time.sleep, clock=time.monotonic) -> int:
    """Empty `box` (a list holding the old version, and nothing else holding the list) and free
    what it held a piece at a time. Waits up to WAIT_FOR_OWNERSHIP for other holders to let go
    of the top object first (the swap that retired it may still be finishing on the reactor
    thread). Returns how many containers and objects were taken apart (for tests)."""
    if not box:
        return 0
    deadline = clock() + WAIT_FOR_OWNERSHIP
    # `box` holds it once; the call's argument once more.
    while sys.getrefcount(box[0]) > _ONLY_OURS and clock() < deadline:
        sleep(0.01)
    stack = [box.pop()]
    box.clear()
    taken_apart = 0
    while stack:
        obj = stack.pop()
        if sys.getrefcount(obj) > _ONLY_OURS:
            del obj
            continue  # someone else holds it: it stays whole for them
        kind = type(obj)
        if kind is dict:
            while obj:
                for _ in range(min(PIECE, len(obj))):
                    _key, value = obj.popitem()
                    if _worth_taking_apart(value):
                        stack.append(value)
                del _key, value
        elif kind is list:
            while obj:
                tail = obj[-PIECE:]
                del obj[-PIECE:]
                stack.extend(value for value in tail if _worth_taking_apart(value))
                del tail
        elif kind is set:
            while obj:
                for _ in range(min(PIECE, len(obj))):
                    obj.pop()
        elif _is_own_object(obj):
            for name in _attribute_names(obj):
                try:
                    value = getattr(obj, name)
                    object.__delattr__(obj, name)  # frozen attrs classes too: nobody else sees it
                except AttributeError:
                    continue
                if _worth_taking_apart(value):
                    stack.append(value)
                del value
        else:
            del obj
            continue
        taken_apart += 1
        del obj
    return taken_apart


__all__ = ["release_in_pieces"]
