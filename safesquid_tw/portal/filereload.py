"""When the policy file is loaded again (SIGHUP), which versions applied in the portal or the
API does it replace? The history answers: the versions newer than the file's last load whose
source is not a file. The portal shows a warning about them; the log names them; a rollback to
the newest of them brings them back.
"""

from __future__ import annotations

from typing import Any

NOTE = "; replaced portal/API version(s) "


def versions_the_file_replaces(history: Any, source: str) -> list[Any]:
    """Newest first: versions applied since the file (`source`) was last loaded, not from a file."""
    replaced = []
    for info in history.versions():  # newest first
        if info.source == source:
            break
        if not info.source.startswith("file"):
            replaced.append(info)
    return replaced


def replaced_comment(replaced: list[Any]) -> str:
    versions = ", ".join(str(info.version) for info in reversed(replaced))
    return f"{NOTE}{versions} (roll back to version {replaced[0].version} to bring them back)"


def discarded_warning(history: Any) -> str | None:
    """The portal's warning when the running version is a file reload that replaced portal edits."""
    if history is None:
        return None
    versions = history.versions()
    if not versions:
        return None
    current = versions[0]
    if not current.source.startswith("file") or NOTE not in current.comment:
        return None
    detail = current.comment.split(NOTE, 1)[1]
    return (f"Version {current.version} was loaded from the policy file ({current.source[5:]}) and replaced "
            f"versions applied here: {detail}.")


__all__ = ["discarded_warning", "replaced_comment", "versions_the_file_replaces"]
