"""The "test directory settings" action: bind, find a user, list their groups.

Runs the same code the proxy runs (a fresh `LdapDirectory`, so nothing cached hides a problem)
and reports each step in words an administrator can act on. Blocking: call it from a thread.
"""

from __future__ import annotations

from typing import Any

from safesquid_tw.identity.errors import DirectoryUnavailable


def test_directory(document: dict[str, Any], user: str, password: str | None = None) -> dict[str, Any]:
    """{"ok": bool, "steps": [...], "user_dn", "directory_groups", "policy_groups", "error"}."""
    from safesquid_tw.identity.authenticator import DirectoryAuthenticator, DirectoryState
    from safesquid_tw.identity.ldapdir import DirectorySettings, LdapDirectory

    section = document.get("authentication", {}).get("directory")
    result: dict[str, Any] = {"ok": False, "steps": [], "user_dn": None, "directory_groups": [],
                              "policy_groups": [], "error": None}
    if not section:
        result["error"] = "this policy has no directory (authentication.directory)"
        return result
    settings = DirectorySettings.from_policy(section)
    directory = LdapDirectory(settings)
    steps = result["steps"]
    try:
        directory.probe()
        steps.append(f"bound to the directory as {settings.bind_dn}")
        found = directory.find_user(user)
        if found is None:
            result["error"] = f"no single entry matches {settings.user_filter.replace('{user}', user)} under {settings.user_base}"
            return result
        steps.append(f"found {found.dn}")
        result["user_dn"] = found.dn
        result["directory_groups"] = sorted(found.groups)
        mapping = DirectoryAuthenticator(DirectoryState(settings, directory=directory), document.get("groups", ()))
        result["policy_groups"] = sorted(mapping.policy_groups(found.groups))
        steps.append(f"{len(found.groups)} directory group(s), {len(result['policy_groups'])} policy group(s)")
        if password:
            if directory.authenticate(user, password) is None:
                result["error"] = "the password was refused (bind as the user failed)"
                return result
            steps.append("the password binds as the user")
        result["ok"] = True
    except DirectoryUnavailable as e:
        result["error"] = f"the directory is unavailable: {e}"
    finally:
        directory.close()
    return result


__all__ = ["test_directory"]
