"""The path a request's rules are matched on: one normal form, computed once per request.

Origins do not read a path the way it was typed: they decode ``%73`` to ``s``, resolve ``..``,
merge ``//``, and some decode ``%2F`` to ``/`` or read ``\\`` as ``/``. A rule matched on the raw
bytes would be walked around by any of those spellings, so rules see the path as the most lenient
origin would:

- percent-escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded and every other
  escape is written with upper-case hex (RFC 3986 6.2.2.1 and 6.2.2.2; path and query);
- in the path, ``\\`` is read as ``/``, runs of ``/`` are merged into one, and dot-segments are
  removed (RFC 3986 5.2.4), a segment ``..;x`` or ``.;x`` counting as ``..`` / ``.`` (Tomcat reads
  it so);
- an encoded slash (``%2F``, and ``%5C``) is never decoded in what is forwarded, and rules see
  it as part of a segment (`decision`) and, besides, as a separator (one of `others`).

When an origin could read the path in more than one of these ways (the lenient reading above, the
strict RFC 3986 reading of what is forwarded, the one with ``%2F`` as a separator), rules see each
reading that differs, and the request goes through only when every reading is allowed: a rule
cannot be walked around by choosing the spelling one kind of origin reads differently.

What goes upstream is the client's own spelling, except when it has dot-segments: then the origin
gets the path with them removed (and unreserved escapes decoded), so it cannot resolve them
differently from the rules. RFC 3986 makes that form equivalent; browsers never send dot-segments.

The common path has none of ``%``, ``\\``, ``//`` or ``/.`` and costs four substring tests.
"""

from __future__ import annotations

import attrs

from safesquid_tw.policy.escapes import normal_escapes

__all__ = ["NormalPath", "blocked_request_any", "normalise_path", "remove_dot_segments", "strictest_decision"]


@attrs.frozen(slots=True)
class NormalPath:
    """forward: what goes upstream; decision: the lenient reading rules match first (logged
    categories and applications come from it); others: further readings that differ from it."""

    forward: str
    decision: str
    others: tuple[str, ...] = ()


def normalise_path(path: str) -> NormalPath:
    """Normalise an origin-form path (with its query, if any); never raises."""
    if "%" not in path and "\\" not in path and "//" not in path and "/." not in path:
        return NormalPath(path, path)
    raw_path, question, query = path.partition("?")
    syntax = normal_escapes(raw_path)
    if question and "%" in query:
        query = normal_escapes(query)
    tail = question + query
    forward = path
    strict = syntax
    if "/." in syntax:
        strict = remove_dot_segments(syntax) or "/"
        if strict != syntax:
            forward = strict + question + path.partition("?")[2]
    decision = _for_rules(syntax) + tail
    readings = [strict + tail]
    if "%2F" in syntax or "%5C" in syntax:  # normal_escapes wrote them upper-case
        readings.append(_for_rules(syntax.replace("%2F", "/").replace("%5C", "/")) + tail)
    others = tuple(dict.fromkeys(r for r in readings if r != decision))
    return NormalPath(forward, decision, others)


def _for_rules(path: str) -> str:
    if "\\" in path:
        path = path.replace("\\", "/")
    while "//" in path:
        path = path.replace("//", "/")
    if "/." in path:
        path = remove_dot_segments(path, path_parameters=True)
    return path or "/"


def remove_dot_segments(path: str, *, path_parameters: bool = False) -> str:
    """RFC 3986 5.2.4 on an absolute path; with path_parameters, ``..;x`` counts as ``..``."""
    segments = path.split("/")
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        name = segment.partition(";")[0] if path_parameters else segment
        if name == ".":
            if i == last:
                out.append("")
        elif name == "..":
            if len(out) > 1:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(segment)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def strictest_decision(compiled, facts, other_paths: tuple[str, ...], decision):
    """The first refusal among the other readings of the path, else the allowing `decision`."""
    for path in other_paths:
        other = compiled.decide(attrs.evolve(facts, path=path))
        if other.action != "allow":
            return other
    return decision


def blocked_request_any(content, target) -> str | None:
    """Why any reading of the target's path is refused by extension, or None."""
    reason = content.blocked_request(target.match_path)
    if reason is None:
        for path in target.other_paths:
            reason = content.blocked_request(path)
            if reason is not None:
                break
    return reason
