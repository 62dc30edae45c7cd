"""A node's own startup parameters, edited in a slave's portal: `<state-dir>/startup.json`.

These are node-local (never synced, never part of the policy): the proxy and portal endpoints,
the master's address and the node's name. The node reads the file when it starts, where its
values take the place of the command line's; a change takes effect at the next start, which
the portal's restart button brings about.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.internet import endpoints
from twisted.logger import Logger

from safesquid_tw.util.atomic import atomic_write

log = Logger()

FIELDS = ("listen", "portal", "master", "node_name")
FILE_NAME = "startup.json"
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


class StartupParamError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _ParseOnly:
    """Endpoint parsing needs a reactor argument but never calls it."""


def _check_endpoint(field: str, value: str) -> str:
    try:
        endpoints.serverFromString(_ParseOnly(), value)
    except Exception as e:
        raise StartupParamError(field, f"{value!r} is not a server endpoint ({e}); e.g. tcp:8080:interface=10.0.0.5")
    return value


def _check_master(value: str) -> str:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in value):
        raise StartupParamError("master", f"{value!r} is not HOST:PORT (e.g. 10.0.0.1:8888)")
    return value


def check_params(params: dict[str, Any]) -> dict[str, str]:
    """The parameters with surrounding blanks removed; StartupParamError names a bad field.

    Empty values are left out (the command line's value then applies)."""
    unknown = set(params) - set(FIELDS)
    if unknown:
        raise StartupParamError(sorted(unknown)[0], "unknown startup parameter")
    out: dict[str, str] = {}
    for field in FIELDS:
        value = params.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise StartupParamError(field, "must be text")
        value = value.strip()
        if not value:
            continue
        if field in ("listen", "portal"):
            _check_endpoint(field, value)
        elif field == "master":
            _check_master(value)
        elif not _NODE_NAME.match(value):
            raise StartupParamError(field, "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit")
        out[field] = value
    return out


def read_startup_file(state_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The saved parameters (empty when there is no file); for the node at start."""
    path = Path(state_dir) / FILE_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise StartupParamError("(file)", f"{path} does not hold a JSON object")
    return check_params(data)


def _exec_same_command(reactor: Any) -> None:
    """Stop cleanly, then run the same command line again in this process (same pid)."""
    argv = list(sys.orig_argv) or [sys.executable, *sys.argv]
    reactor.addSystemEventTrigger("after", "shutdown", os.execv, sys.executable, argv)
    reactor.stop()


class StartupParams:
    """What the portal's startup page calls: `load()`, `save(params)`, `restart()`."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        reactor: Any = None,
        restart: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._reactor = reactor
        self._restart = restart

    def load(self) -> dict[str, str]:
        return read_startup_file(self.path.parent)

    def save(self, params: dict[str, Any]) -> dict[str, str]:
        checked = check_params(params)
        atomic_write(self.path, json.dumps(checked, indent=1, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)
        return checked

    def restart(self) -> None:
        if self._restart is not None:
            self._restart()
            return
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        log.info("restarting at the administrator's request, with the saved startup parameters")
        # Let the response that asked for it reach the browser first.
        reactor.callLater(0.5, _exec_same_command, reactor)


__all__ = ["FIELDS", "StartupParamError", "StartupParams", "check_params", "read_startup_file"]
