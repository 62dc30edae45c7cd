"""Where an item goes in an ordered list (access rules are first-match, so order is meaning).

A position is `top`, `end`, `before:NAME` or `after:NAME` (`keep` leaves an edited item where
it is). The same words are used by the list page, the item form and the API.
"""

from __future__ import annotations

import copy
from typing import Any

from safesquid_tw.policy.errors import PolicyError


def parse_position(value: Any) -> str:
    """The API's position (`"top"`, `{"before": "x"}` ...) or the form's, as `top|end|before:x|after:x|keep`."""
    if isinstance(value, dict) and len(value) == 1:
        (where, name), = value.items()
        if where in ("before", "after") and isinstance(name, str) and name:
            return f"{where}:{name}"
    if isinstance(value, str):
        if value in ("top", "end", "keep") or (value.partition(":")[0] in ("before", "after") and value.partition(":")[2]):
            return value
    raise ValueError("a position is 'top', 'end', {'before': NAME} or {'after': NAME}")


def move_to(items: list[dict[str, Any]], index: int, position: str) -> list[dict[str, Any]]:
    """A copy of `items` with the item at `index` moved to `position`; ValueError names a missing rule."""
    if position == "keep":
        return copy.deepcopy(items)
    moved = copy.deepcopy(items)
    item = moved.pop(index)
    if position == "top":
        moved.insert(0, item)
    elif position == "end":
        moved.append(item)
    else:
        where, _, name = position.partition(":")
        names = [other.get("name") for other in moved]
        if name not in names:
            raise ValueError(f"there is no {name!r} to put it {where}")
        target = names.index(name)
        moved.insert(target if where == "before" else target + 1, item)
    return moved


def place_in_document(document: dict[str, Any], path: tuple[str, ...], index: int, position: str) -> dict[str, Any]:
    """A copy of `document` with the list at `path` reordered by `move_to`."""
    changed = copy.deepcopy(document)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    try:
        parent[path[-1]] = move_to(parent[path[-1]], index, position)
    except ValueError as e:
        raise PolicyError(".".join(path), str(e)) from None
    return changed


def position_choices(items: list[dict[str, Any]], index: int | None) -> list[tuple[str, str]]:
    """(value, label) pairs for the item form's position menu."""
    choices = [("keep", "Where it is")] if index is not None else []
    choices += [("top", "At the top (decides first)")]
    for i, item in enumerate(items):
        if i == index:
            continue
        choices.append((f"before:{item['name']}", f"Before {item['name']}"))
        choices.append((f"after:{item['name']}", f"After {item['name']}"))
    choices.append(("end", "At the end"))
    return choices


__all__ = ["move_to", "parse_position", "place_in_document", "position_choices"]
