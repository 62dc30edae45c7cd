"""The policy sections as forms: which fields each has, and the way between form and document.

Pure functions over plain values (no Twisted): a section's items become form values (text the
administrator can edit), and submitted form values become document fragments for the policy
validator to judge. Its PolicyError is then mapped back to the field it is about, so the page
shows the message next to that field.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import DAYS
from safesquid_tw.policy.validate import ACCESS_RESTRICTION_DEFAULTS, DETECTOR_TYPES, DLP_ACTIONS

FormValues = dict[str, Any]  # field key -> str, bool or list[str]


@attrs.frozen
class Field:
    key: str  # key in the item; "schedule.from" for a key of the nested schedule
    label: str
    kind: str  # text, textarea, lines, ports, int, int_or_null, bool, select, multi, headers, password
    help: str = ""
    choices: tuple[str, ...] = ()
    choices_from: str | None = None  # "users", "groups", "categories", "applications" of the document
    required: bool = False


@attrs.frozen
class ObjectForm:
    """A form over one object of the document (a section, or part of one)."""

    name: str
    title: str
    path: tuple[str, ...]
    fields: tuple[Field, ...]
    defaults: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ListForm:
    """A form over the items of a list (or of a name -> item mapping) in the document."""

    name: str
    title: str
    noun: str  # "rule", "user", ...
    path: tuple[str, ...]
    fields: tuple[Field, ...]
    mapping: bool = False  # categories: {name: {...}} rather than [{"name": ...}]
    summary: Callable[[dict[str, Any]], str] = lambda item: ""

    def error_prefix(self, index: int, name: str) -> str:
        if self.mapping:
            return ".".join(self.path) + f".{name}"
        return ".".join(self.path) + f"[{index}] ({name})"


@attrs.frozen
class Section:
    slug: str
    title: str
    intro: str
    objects: tuple[ObjectForm, ...] = ()
    lists: tuple[ListForm, ...] = ()


def _join(values: Any, limit: int = 4) -> str:
    values = list(values or ())
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit})" if len(values) > limit else "")


def rule_summary(rule: dict[str, Any]) -> str:
    parts = []
    for key in ("clients", "users", "groups", "domains", "url_patterns", "methods", "ports", "categories",
                "applications"):
        if key in rule:
            parts.append(f"{key.replace('_', ' ')}: {_join(rule[key])}")
    if "schedule" in rule:
        schedule = rule["schedule"]
        parts.append(f"schedule: {_join(schedule['days'], 7)} {schedule['from']}-{schedule['to']}")
    return "; ".join(parts) or "every request"


NETWORKS_HELP = "One address or CIDR network per line, e.g. 10.0.0.0/8"
RULE_FIELDS = (
    Field("name", "Name", "text", required=True),
    Field("action", "Action", "select", choices=("deny", "allow")),
    Field("reason", "Reason shown on the block page", "text"),
    Field("enabled", "Enabled", "bool"),
    Field("clients", "Client networks", "lines", NETWORKS_HELP),
    Field("users", "Users", "multi", choices_from="users"),
    Field("groups", "Groups", "multi", choices_from="groups"),
    Field("domains", "Domains", "lines", "One per line: example.com (that host) or *.example.com (and subdomains)"),
    Field("url_patterns", "URL patterns", "lines", "Shell-style patterns over the whole URL, e.g. */ads/*"),
    Field("methods", "Methods", "lines", "e.g. GET, POST, CONNECT; one per line"),
    Field("ports", "Destination ports", "ports", "One per line: 80 or a range 8000-8100"),
    Field("categories", "Categories", "multi", choices_from="categories"),
    Field("applications", "Applications", "multi", choices_from="applications"),
    Field("schedule", "Only at these times", "bool"),
    Field("schedule.days", "Days", "multi", choices=DAYS),
    Field("schedule.from", "From", "text", "HH:MM"),
    Field("schedule.to", "To", "text", "HH:MM (24:00 is the end of the day)"),
    Field("schedule.timezone", "Time zone", "text", "IANA name, e.g. Europe/Berlin; empty: the node's"),
)

SECTIONS: tuple[Section, ...] = (
    Section(
        "access", "Access rules",
        "Ordered rules: the first that matches a request decides; when none does, the default action applies.",
        objects=(ObjectForm("default", "Default action", ("access",), (
            Field("default_action", "When no rule matches", "select", choices=("allow", "deny")),)),),
        lists=(ListForm("rules", "Rules", "rule", ("access", "rules"), RULE_FIELDS, summary=rule_summary),),
    ),
    Section(
        "users", "Users, groups and authentication",
        "Proxy users log in with HTTP Basic authentication; their passwords are stored as argon2id hashes only.",
        objects=(ObjectForm("authentication", "Authentication", ("authentication",), (
            Field("enabled", "Ask clients to log in", "bool"),
            Field("realm", "Realm", "text"),
            Field("exempt_networks", "Networks exempt from logging in", "lines", NETWORKS_HELP),
        )),),
        lists=(
            ListForm("groups", "Groups", "group", ("groups",), (
                Field("name", "Name", "text", required=True), Field("description", "Description", "text"),
            ), summary=lambda g: g.get("description", "")),
            ListForm("users", "Users", "user", ("users",), (
                Field("name", "Name", "text", required=True),
                Field("password", "Password", "password", "Leave empty to keep the current password"),
                Field("groups", "Groups", "multi", choices_from="groups"),
            ), summary=lambda u: "groups: " + (_join(u.get("groups")) or "none")),
        ),
    ),
    Section(
        "categories", "Web categories",
        "Named lists of domains; a host belongs to a category when it or a parent domain is listed.",
        lists=(ListForm("categories", "Categories", "category", ("categories",), (
            Field("name", "Name", "text", required=True),
            Field("description", "Description", "text"),
            Field("domains", "Domains", "lines", "One domain per line"),
        ), mapping=True, summary=lambda c: f"{len(c.get('domains', []))} domains: {_join(c.get('domains'), 3)}"),),
    ),
    Section(
        "applications", "Application signatures",
        "Signatures that name the application of a request; the first that matches, in this order, wins.",
        lists=(ListForm("applications", "Applications", "application", ("applications",), (
            Field("name", "Name", "text", required=True),
            Field("description", "Description", "text"),
            Field("hosts", "Hosts", "lines", "One per line: example.com or *.example.com", required=True),
            Field("paths", "Paths", "lines", "Shell-style patterns over path and query, one per line"),
            Field("headers", "Headers", "headers", "One per line: header-name: pattern"),
        ), summary=lambda a: "hosts: " + _join(a.get("hosts"))),),
    ),
    Section(
        "content", "Content security",
        "File types and sizes the gateway refuses, enforced while bodies stream.",
        objects=(ObjectForm("content_security", "Content security", ("content_security",), (
            Field("blocked_mime_types", "Blocked MIME types", "lines", "type/subtype or type/*, one per line"),
            Field("blocked_extensions", "Blocked file extensions", "lines", "Without the dot, one per line"),
            Field("max_upload_bytes", "Largest upload (bytes)", "int_or_null", "Empty: no limit"),
            Field("max_download_bytes", "Largest download (bytes)", "int_or_null", "Empty: no limit"),
        )),),
    ),
    Section(
        "dlp", "Data loss prevention",
        "Detectors over query strings and request bodies; each blocks the request or only logs it.",
        objects=(ObjectForm("scan", "Scanning", ("dlp",), (
            Field("scan_limit_bytes", "Bytes of each body scanned", "int"),)),),
        lists=(ListForm("detectors", "Detectors", "detector", ("dlp", "detectors"), (
            Field("name", "Name", "text", required=True),
            Field("type", "Type", "select", choices=DETECTOR_TYPES),
            Field("patterns", "Patterns", "lines", "Keywords or regular expressions, one per line "
                  "(none for card_number)"),
            Field("action", "Action", "select", choices=DLP_ACTIONS),
        ), summary=lambda d: f"{d['type']}, {d['action']}" + (f": {_join(d.get('patterns'), 3)}"
                                                              if d.get("patterns") else "")),),
    ),
    Section(
        "restriction", "Access restriction",
        "Which client networks may use this portal and its API, and which slaves may join the cluster.",
        objects=(ObjectForm("access_restriction", "Allow lists", ("access_restriction",), (
            Field("portal_allow", "Networks allowed to use the portal and API", "lines",
                  NETWORKS_HELP + ". Empty: every network."),
            Field("slave_allow_enabled", "Admit only listed slaves", "bool"),
            Field("slave_allow", "Slave networks", "lines", NETWORKS_HELP),
        ), defaults=ACCESS_RESTRICTION_DEFAULTS),),
    ),
    Section(
        "connect", "CONNECT ports",
        "Destination ports that CONNECT tunnels (HTTPS) may reach.",
        objects=(ObjectForm("connect", "Ports", ("connect",), (
            Field("allowed_ports", "Allowed ports", "ports", "One port per line"),)),),
    ),
)

SECTIONS_BY_SLUG = {s.slug: s for s in SECTIONS}


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
        elif kind == "password":
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
    target = dict(form.defaults) if form.path[-1] not in parent else dict(parent[form.path[-1]])
    for field in form.fields:
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
