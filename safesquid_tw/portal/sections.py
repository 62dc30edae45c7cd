"""The way between the policy document and the portal's forms.

Pure functions over plain values (no Twisted): a section's items become form values (text the
administrator can edit), and submitted form values become document fragments for the policy
validator to judge. Its PolicyError is then mapped back to the field it is about, so the page
shows the message next to that field. Which forms and fields there are: `formspec.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import DAYS
from safesquid_tw.portal.formspec import (  # noqa: F401 - the pages reach the spec through here
    SECTIONS,
    SECTIONS_BY_SLUG,
    Field,
    FormValues,
    ListForm,
    ObjectForm,
    Section,
    rule_summary,
)

# -- reading the document ------------------------------------------------------------------------


def get_path(document: dict[str, Any], path: tuple[str, ...], default: Any = None) -> Any:
    node: Any = document
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def list_items(document: dict[str, Any], form: ListForm) -> list[dict[str, Any]]:
    """The items of a list form, each with its name (categories: the mapping's key)."""
    container = get_path(document, form.path, {} if form.mapping else [])
    if form.mapping:
        return [{"name": name, **item} for name, item in container.items()]
    return list(container)


def choices(document: dict[str, Any], source: str) -> list[str]:
    if source == "categories":
        return list(document.get("categories", {}))
    return [item["name"] for item in document.get(source, [])]


def _get_field(item: dict[str, Any], key: str) -> Any:
    if "." in key:
        outer, inner = key.split(".", 1)
        return (item.get(outer) or {}).get(inner)
    return item.get(key)


def to_form(fields: tuple[Field, ...], item: dict[str, Any]) -> FormValues:
    """Form values showing `item` (an existing item, or {} for a new one)."""
    values: FormValues = {}
    for field in fields:
        value = _get_field(item, field.key)
        kind = field.kind
        if kind in ("lines", "ports"):
            values[field.key] = "\n".join(str(v) for v in value or ())
        elif kind == "headers":
            values[field.key] = "\n".join(f"{k}: {v}" for k, v in (value or {}).items())
        elif kind == "bool":
            values[field.key] = bool(value) if field.key != "enabled" or value is not None else True
        elif kind == "multi":
            values[field.key] = list(value or ())
        elif kind in ("password", "secret"):
            values[field.key] = ""  # never shown, not even as a hash
        elif kind in ("int", "int_or_null"):
            values[field.key] = "" if value is None else str(value)
        else:
            values[field.key] = "" if value is None else str(value)
    if "schedule" in {f.key for f in fields} and "schedule" not in item:
        values.update({"schedule.days": list(DAYS), "schedule.from": "00:00", "schedule.to": "24:00"})
    return values


def read_form(fields: tuple[Field, ...], get: Callable[[str], str], getall: Callable[[str], list[str]],
              checked: Callable[[str], bool]) -> FormValues:
    """What the administrator submitted, as form values (kept to show again on errors)."""
    values: FormValues = {}
    for field in fields:
        if field.kind == "bool":
            values[field.key] = checked(field.key)
        elif field.kind == "multi":
            values[field.key] = getall(field.key)
        else:
            values[field.key] = get(field.key)
    return values


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r", "").split("\n") if line.strip()]


def from_form(fields: tuple[Field, ...], values: FormValues) -> tuple[dict[str, Any], dict[str, str]]:
    """(document fragment, field errors) from form values; empty lists leave their key out.

    Password fields are not converted here (they are hashed by the caller)."""
    item: dict[str, Any] = {}
    errors: dict[str, str] = {}
    schedule_on = values.get("schedule") is True
    for field in fields:
        raw = values.get(field.key)
        kind = field.kind
        key = field.key
        if key.startswith("schedule."):
            if not schedule_on:
                continue
            inner = key.split(".", 1)[1]
            target = item.setdefault("schedule", {})
            if kind == "multi":
                target[inner] = list(raw or [])
            elif raw or inner != "timezone":
                target[inner] = (raw or "").strip()
            continue
        if key == "schedule" or kind == "password":
            continue
        if kind == "lines":
            lines = _lines(raw or "")
            if lines:
                item[key] = lines
        elif kind == "ports":
            ports: list[Any] = []
            for line in _lines(raw or ""):
                ports.append(int(line) if line.isdigit() else line)
            if ports:
                item[key] = ports
        elif kind == "secret":
            if raw:
                item[key] = raw  # empty: the stored value stays (put_object)
        elif kind == "number":
            text = (raw or "").strip()
            if text:
                try:
                    item[key] = float(text) if "." in text else int(text)
                except ValueError:
                    errors[key] = f"{text!r} is not a number"
        elif kind in ("int", "int_or_null"):
            text = (raw or "").strip().replace("_", "")
            if not text:
                if kind == "int":
                    errors[key] = "a whole number is needed"
                else:
                    item[key] = None
            elif text.isdigit():
                item[key] = int(text)
            else:
                errors[key] = f"{text!r} is not a whole number"
        elif kind == "bool":
            item[key] = raw is True
        elif kind == "multi":
            if raw:
                item[key] = list(raw)
        elif kind == "headers":
            headers: dict[str, str] = {}
            for line in _lines(raw or ""):
                name, colon, pattern = line.partition(":")
                if not colon or not name.strip() or not pattern.strip():
                    errors[key] = f"{line!r} is not 'header-name: pattern'"
                    break
                headers[name.strip()] = pattern.strip()
            if headers:
                item[key] = headers
        else:
            text = (raw or "").strip() if kind != "textarea" else (raw or "")
            if text or field.required or key in ("realm", "default_action", "action", "type"):
                item[key] = text
    return item, errors


# -- changing the document ----------------------------------------------------------------------


def put_object(document: dict[str, Any], form: ObjectForm, fragment: dict[str, Any]) -> dict[str, Any]:
    """A copy of `document` whose object at `form.path` has the form's fields from `fragment`."""
    changed = copy.deepcopy(document)
    parent: dict[str, Any] = changed
    for key in form.path[:-1]:
        parent = parent.setdefault(key, {})
    if form.present_when is not None and not fragment.get(form.present_when):
        parent.pop(form.path[-1], None)  # e.g. no directory servers: no directory at all
        return changed
    existing = parent.get(form.path[-1])
    target = dict(form.defaults) if not isinstance(existing, dict) else dict(existing)
    for field in form.fields:
        if field.kind == "secret" and field.key not in fragment:
            continue  # write-only: left empty, the stored value stays
        target.pop(field.key, None)
        if field.key in fragment:
            target[field.key] = fragment[field.key]
    parent[form.path[-1]] = target
    return changed


def _container(document: dict[str, Any], form: ListForm) -> Any:
    parent: dict[str, Any] = document
    for key in form.path[:-1]:
        parent = parent.setdefault(key, {})
    return parent.setdefault(form.path[-1], {} if form.mapping else [])


def put_item(document: dict[str, Any], form: ListForm, index: int | None, item: dict[str, Any]) -> dict[str, Any]:
    """A copy with `item` at `index` (None: appended)."""
    changed = copy.deepcopy(document)
    container = _container(changed, form)
    if form.mapping:
        body = {k: v for k, v in item.items() if k != "name"}
        names = list(container)
        entries = [(n, container[n]) for n in names]
        if index is None:
            entries.append((item["name"], body))
        else:
            entries[index] = (item["name"], body)
        container.clear()
        for name, value in entries:
            if name in container:
                raise PolicyError(form.error_prefix(index or 0, name) + ".name", f"{name!r} is used twice")
            container[name] = value
    elif index is None:
        container.append(item)
    else:
        container[index] = item
    return changed


def remove_item(document: dict[str, Any], form: ListForm, index: int) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    container = _container(changed, form)
    if form.mapping:
        del container[list(container)[index]]
    else:
        del container[index]
    return changed


def move_item(document: dict[str, Any], form: ListForm, index: int, step: int) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    container = _container(changed, form)
    target = index + step
    if form.mapping or not 0 <= target < len(container):
        return changed
    container[index], container[target] = container[target], container[index]
    return changed


# -- errors --------------------------------------------------------------------------------------


def field_for_error(error: PolicyError, prefixes: tuple[str, ...], fields: tuple[Field, ...]) -> str | None:
    """The form field a validation error is about, when it is inside the item one of `prefixes`
    names (an item's path carries its name, `access.rules[2] (r)`, unless the name itself is
    what is wrong: `access.rules[2].name`)."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        path = error.path
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if rest and rest[0] not in ".[":
            continue
        return _field_in(rest.lstrip("."), fields)
    return None


def _field_in(rest: str, fields: tuple[Field, ...]) -> str | None:
    keys = {f.key for f in fields}
    first = rest.split(".")[0].split("[")[0]
    if first == "schedule":
        nested = rest[len("schedule"):].lstrip(".").split("[")[0]
        candidate = f"schedule.{nested}" if nested else "schedule"
        return candidate if candidate in keys else "schedule"
    if first == "password_hash" and "password" in keys:
        return "password"
    if first in keys:
        return first
    return "name" if not first and "name" in keys else None


__all__ = [
    "SECTIONS",
    "SECTIONS_BY_SLUG",
    "Field",
    "ListForm",
    "ObjectForm",
    "Section",
    "choices",
    "field_for_error",
    "from_form",
    "get_path",
    "list_items",
    "move_item",
    "put_item",
    "put_object",
    "read_form",
    "remove_item",
    "rule_summary",
    "to_form",
]
