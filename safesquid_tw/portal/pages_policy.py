"""Policy editing: a page per section, item forms, and the draft that "Apply" turns into a version.

Every edit is validated as a whole document before it is kept, so a draft always holds a valid
policy; a refused edit is shown again as typed, with the validator's message next to its field.
Validation, password hashing and draft files run in threads.
"""

from __future__ import annotations

from typing import Any

from safesquid_tw.policy.applier import PolicySuperseded
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.hashpw import hash_password
from safesquid_tw.policy.shadowing import policy_warnings, shadowed_rules
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.portal import sections as S
from safesquid_tw.portal.allowlist import address_in, portal_networks
from safesquid_tw.portal.diffview import classify, counts, document_diff
from safesquid_tw.portal.drafts import Draft
from safesquid_tw.portal.positions import parse_position, place_in_document, position_choices
from safesquid_tw.portal.web import Call, Error, Page, Redirect, Reply, Route, route
from safesquid_tw.portal.worklimit import Busy

READ_ONLY = Error(409, "Read-only", "This node's policy is managed by its master; change it there.")


class _Gone(Exception):
    """The item a form was about is no longer where it was (the draft changed meanwhile)."""


async def working_document(call: Call) -> tuple[dict[str, Any] | None, Draft | None]:
    draft = await call.services.in_thread(call.services.drafts.load, call.account)
    if draft is not None:
        return draft.document, draft
    current = call.services.ctx.store.current
    return (current.document if current is not None else None), None


async def keep_in_draft(call: Call, document: dict[str, Any], change: str) -> dict[str, Any]:
    """Validate `document` (PolicyError if it is not valid) and make it the account's draft."""
    services = call.services
    canonical = await services.in_thread(validate_document, document)

    def save() -> None:
        draft = services.drafts.load(call.account)
        if draft is None:
            current = services.ctx.store.current
            draft = services.drafts.start(current.version if current else None,
                                          current.digest if current else None, canonical)
        services.drafts.save(call.account, draft.with_change(canonical, change, services.drafts.now()))

    await services.in_thread(save)
    return canonical


def _section(call: Call) -> S.Section | None:
    return S.SECTIONS_BY_SLUG.get(call.params.get("section", ""))


def _list_form(section: S.Section, name: str) -> S.ListForm | None:
    return next((f for f in section.lists if f.name == name), None)


def _object_form(section: S.Section, name: str) -> S.ObjectForm | None:
    return next((f for f in section.objects if f.name == name), None)


def _choices(document: dict[str, Any], fields: tuple[S.Field, ...]) -> dict[str, list[str]]:
    return {f.key: (list(f.choices) if f.choices else S.choices(document, f.choices_from or ""))
            for f in fields if f.kind in ("select", "multi")}


def _no_policy() -> Error:
    return Error(503, "No policy yet", "This node has no policy loaded yet.")


async def _open_list(call: Call, *, editing: bool) -> tuple[S.Section, S.ListForm, dict[str, Any]] | Reply:
    """The section and list a request names, with the working document; or the answer why not."""
    if editing and call.services.ctx.read_only:
        return READ_ONLY
    section = _section(call)
    lf = _list_form(section, call.params["list"]) if section else None
    if section is None or lf is None:
        return Error(404, "Not found", "There is no such list in the policy.")
    document, _draft = await working_document(call)
    if document is None:
        return _no_policy()
    return section, lf, document


# -- pages ---------------------------------------------------------------------------------------


async def policy_index(call: Call) -> Reply:
    document, draft = await working_document(call)
    if document is None:
        return _no_policy()
    summary = []
    for section in S.SECTIONS:
        sizes = [f"{len(S.list_items(document, lf))} {lf.noun}(s)" for lf in section.lists]
        summary.append((section, ", ".join(sizes)))
    return Page("portal/policy_index.html", {"sections": summary, "draft": draft,
                                             "current": call.services.ctx.store.current})


async def section_page(call: Call, *, object_errors: dict[str, dict[str, str]] | None = None,
                       object_values: dict[str, dict[str, Any]] | None = None, general_error: str | None = None,
                       code: int = 200) -> Reply:
    section = _section(call)
    if section is None:
        return Error(404, "Not found", "There is no such policy section.")
    document, draft = await working_document(call)
    if document is None:
        return _no_policy()
    objects = []
    for of in section.objects:
        values = (object_values or {}).get(of.name)
        if values is None:
            values = S.to_form(of.fields, S.get_path(document, of.path, dict(of.defaults)))
        objects.append({"form": of, "values": values, "errors": (object_errors or {}).get(of.name, {}),
                        "choices": _choices(document, of.fields)})
    lists = [{"form": lf, "items": S.list_items(document, lf), "warnings": {}} for lf in section.lists]
    # Rules an earlier rule shadows, by position, shown beside them and above the list.
    shadows = shadowed_rules(document) if any(lf.path == ("access", "rules") for lf in section.lists) else []
    for lst in lists:
        if lst["form"].path == ("access", "rules"):
            lst["warnings"] = {w.index: w for w in shadows}
    return Page("portal/section.html", {"section": section, "objects": objects, "lists": lists, "draft": draft,
                                        "general_error": general_error, "sections": S.SECTIONS,
                                        "shadows": shadows}, code=code)


def _item_page(call: Call, section: S.Section, lf: S.ListForm, document: dict[str, Any], index: int | None,
               values: dict[str, Any], errors: dict[str, str], general_error: str | None = None,
               original_name: str = "", code: int = 200, position: str = "") -> Page:
    positions = [] if lf.mapping else position_choices(S.list_items(document, lf), index)
    default = "keep" if index is not None else ("top" if lf.path == ("access", "rules") else "end")
    return Page("portal/item_form.html", {
        "section": section, "form": lf, "index": index, "values": values, "errors": errors,
        "general_error": general_error, "choices": _choices(document, lf.fields), "original_name": original_name,
        "sections": S.SECTIONS, "positions": positions, "position": position or default,
    }, code=code)


def _index(call: Call) -> int | None:
    raw = call.params.get("index", "new")
    if raw == "new":
        return None
    if not raw.isdigit():
        raise _Gone()
    return int(raw)


async def item_form(call: Call) -> Reply:
    opened = await _open_list(call, editing=False)
    if not isinstance(opened, tuple):
        return opened
    section, lf, document = opened
    items = S.list_items(document, lf)
    try:
        index = _index(call)
        item = items[index] if index is not None else {}
    except (_Gone, IndexError):
        return Error(404, "Not found", f"There is no such {lf.noun} in the policy.")
    return _item_page(call, section, lf, document, index, S.to_form(lf.fields, item), {},
                      original_name=item.get("name", ""))


async def save_item(call: Call) -> Reply:
    opened = await _open_list(call, editing=True)
    if not isinstance(opened, tuple):
        return opened
    section, lf, document = opened
    items = S.list_items(document, lf)
    form = call.form
    original = form.get("original_name")
    values = S.read_form(lf.fields, form.get, form.getall, form.checked)
    try:
        index = _index(call)
        if index is not None and items[index]["name"] != original:
            raise _Gone()
    except (_Gone, IndexError):
        return _item_page(call, section, lf, document, None, values, {}, code=409, general_error=(
            f"This {lf.noun} changed or went away meanwhile (in another tab?). Check the list, then try again."))
    fragment, errors = S.from_form(lf.fields, values)
    if any(f.kind == "password" for f in lf.fields):
        password = form.get("password")
        if password:
            try:  # argon2id: with the portal's other password work, a few at a time
                fragment["password_hash"] = await call.services.passwords.run(hash_password, password)
            except Busy:
                errors["password"] = "the portal is busy checking passwords: try again in a few seconds"
        elif index is not None and "password_hash" in items[index]:
            fragment["password_hash"] = items[index]["password_hash"]
        else:
            errors["password"] = f"a new {lf.noun} needs a password"
    page_args = dict(original_name=original, position=form.get("position"))
    position = form.get("position") or ("end" if index is None else "keep")
    if not lf.mapping:
        try:
            position = parse_position(position)
        except ValueError as e:
            errors["position"] = str(e)
    if errors:
        return _item_page(call, section, lf, document, index, values, errors, code=422, **page_args)
    final_index = index if index is not None else len(items)
    name = str(fragment.get("name", ""))
    prefixes = (lf.error_prefix(final_index, name),) if lf.mapping else (
        lf.error_prefix(final_index, name), ".".join(lf.path) + f"[{final_index}]")
    try:
        changed = S.put_item(document, lf, index, fragment)
        if not lf.mapping and position not in ("keep", "end" if index is None else "keep"):
            changed = place_in_document(changed, lf.path, final_index, position)
        verb = "added" if index is None else "changed"
        await keep_in_draft(call, changed, f"{lf.noun} {name!r} {verb}")
    except PolicyError as e:
        field = S.field_for_error(e, prefixes, lf.fields)
        if field is not None:
            return _item_page(call, section, lf, document, index, values, {field: e.message}, code=422, **page_args)
        return _item_page(call, section, lf, document, index, values, {}, code=422, general_error=str(e),
                          **page_args)
    call.session.flash("ok", f"The {lf.noun} {name!r} is saved in your draft. Apply the draft to put it to use.")
    if lf.path == ("access", "rules"):
        for warning in shadowed_rules(changed):
            if warning.rule == name or warning.by_rule == name:
                call.session.flash("error", f"Warning: {warning.message}.")
    return Redirect(f"/policy/{section.slug}")


async def change_item(call: Call) -> Reply:
    """Delete an item, or move it up or down (order matters for rules and applications)."""
    opened = await _open_list(call, editing=True)
    if not isinstance(opened, tuple):
        return opened
    section, lf, document = opened
    items = S.list_items(document, lf)
    action = call.params["action"]
    try:
        index = _index(call)
        if index is None or items[index]["name"] != call.form.get("original_name"):
            raise _Gone()
    except (_Gone, IndexError):
        call.session.flash("error", f"That {lf.noun} changed or went away meanwhile; nothing was done.")
        return Redirect(f"/policy/{section.slug}")
    name = items[index]["name"]
    if action == "delete":
        changed, change = S.remove_item(document, lf, index), f"{lf.noun} {name!r} deleted"
    elif action in ("up", "down"):
        changed = S.move_item(document, lf, index, -1 if action == "up" else 1)
        change = f"{lf.noun} {name!r} moved {action}"
    elif action in ("top", "end") and not lf.mapping:
        changed = place_in_document(document, lf.path, index, action)
        change = f"{lf.noun} {name!r} moved to the {'top' if action == 'top' else 'end'}"
    else:
        return Error(404, "Not found", "There is no such action.")
    try:
        await keep_in_draft(call, changed, change)
    except PolicyError as e:
        call.session.flash("error", f"Not done: {e}")
        return Redirect(f"/policy/{section.slug}")
    call.session.flash("ok", f"The {change} in your draft.")
    return Redirect(f"/policy/{section.slug}")


async def save_object(call: Call) -> Reply:
    if call.services.ctx.read_only:
        return READ_ONLY
    section = _section(call)
    of = _object_form(section, call.params["object"]) if section else None
    if section is None or of is None:
        return Error(404, "Not found", "There is no such form in the policy.")
    document, _draft = await working_document(call)
    if document is None:
        return _no_policy()
    form = call.form
    values = S.read_form(of.fields, form.get, form.getall, form.checked)
    fragment, errors = S.from_form(of.fields, values)
    if of.name == "access_restriction" and not errors:
        errors.update(_lockout_error(call, fragment))

    def again(errs: dict[str, str] | None = None, general: str | None = None) -> Any:
        return section_page(call, object_errors={of.name: errs or {}}, object_values={of.name: values},
                            general_error=general, code=422)

    if errors:
        return await again(errors)
    try:
        await keep_in_draft(call, S.put_object(document, of, fragment), f"{of.title.lower()} changed")
    except PolicyError as e:
        field = S.field_for_error(e, (".".join(of.path),), of.fields)
        return await (again({field: e.message}) if field else again(general=str(e)))
    call.session.flash("ok", f"{of.title} saved in your draft. Apply the draft to put it to use.")
    return Redirect(f"/policy/{section.slug}")


def _lockout_error(call: Call, fragment: dict[str, Any]) -> dict[str, str]:
    """Refuse a portal allow list that leaves out the address of the administrator saving it."""
    listed = fragment.get("portal_allow") or []
    if not listed:
        return {}
    try:
        networks = portal_networks({"access_restriction": {"portal_allow": listed}})
    except ValueError:
        return {}  # the validator names the bad entry
    address = call.address or ""
    if address_in(address, networks):
        return {}
    return {"portal_allow": f"your own address {address} is not in this list: once applied, you would be locked "
                            "out of the portal. Add it (or its network) first."}


# -- the draft: review, apply, discard ------------------------------------------------------------


async def changes_page(call: Call) -> Reply:
    services = call.services
    draft = await services.in_thread(services.drafts.load, call.account)
    current = services.ctx.store.current
    lines: list[Any] = []
    if draft is not None:
        label = f"version {current.version} (running)" if current else "no policy"
        text = await services.in_thread(document_diff, current.document if current else None, draft.document,
                                        label, "your draft")
        lines = classify(text)
    added, removed = counts(lines)
    return Page("portal/changes.html", {"draft": draft, "current": current, "lines": lines, "added": added,
                                        "removed": removed})


async def apply_draft(call: Call) -> Reply:
    services = call.services
    history = services.ctx.history
    if history is None:
        return READ_ONLY
    draft = await services.in_thread(services.drafts.load, call.account)
    if draft is None:
        call.session.flash("info", "There is no draft to apply.")
        return Redirect("/policy/changes")
    before = services.ctx.store.current
    comment = call.form.get("comment").strip() or "applied from the portal"
    try:
        policy = await history.apply_async(draft.document, by=call.account, comment=comment, source="portal")
    except PolicySuperseded as e:
        call.session.flash("error", f"Not applied: {e}")
        return Redirect("/policy/changes")
    except PolicyError as e:
        call.session.flash("error", f"Not applied: {e}")
        return Redirect("/policy/changes")
    await services.in_thread(services.drafts.discard, call.account)
    if before is not None and policy.version == before.version:
        call.session.flash("info", f"Your draft equals the running version {policy.version}: nothing to apply.")
        return Redirect("/policy/history")
    services.audit.record("apply", actor=call.account, address=call.address, version=policy.version,
                          digest=policy.digest, comment=comment, changes=list(draft.changes))
    call.session.flash("ok", f"Version {policy.version} applied.")
    for warning in policy_warnings(policy):
        call.session.flash("info", f"Warning: {warning.message}.")
    return Redirect("/policy/history")


async def discard_draft(call: Call) -> Reply:
    services = call.services
    if await services.in_thread(services.drafts.discard, call.account):
        call.session.flash("ok", "Your draft was discarded.")
    return Redirect("/policy")


ROUTES: list[Route] = [
    route("GET", "/policy", policy_index),
    route("GET", "/policy/changes", changes_page),
    route("POST", "/policy/apply", apply_draft),
    route("POST", "/policy/discard", discard_draft),
    route("GET", "/policy/{section}", section_page),
    route("POST", "/policy/{section}/settings/{object}", save_object),
    route("GET", "/policy/{section}/{list}/{index}", item_form),
    route("POST", "/policy/{section}/{list}/{index}", save_item),
    route("POST", "/policy/{section}/{list}/{index}/{action}", change_item),
]

__all__ = ["ROUTES", "keep_in_draft", "working_document"]
