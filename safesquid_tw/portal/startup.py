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
# Written by "join a cluster" on a standalone node: at its next start it is a slave of `master`.
JOIN_FIELDS = ("role", "activation_key_file", "master_fingerprint")
FILE_NAME = "startup.json"
KEY_FILE_NAME = "activation-key"
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
    unknown = set(params) - set(FIELDS) - set(JOIN_FIELDS)
    if unknown:
        raise StartupParamError(sorted(unknown)[0], "unknown startup parameter")
    out: dict[str, str] = {}
    for field in (*FIELDS, *JOIN_FIELDS):
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
        elif field == "role":
            if value != "slave":
                raise StartupParamError(field, "only 'slave' can be saved here (a standalone node joining a cluster)")
        elif field == "activation_key_file":
            from safesquid_tw.config import read_activation_key

            try:
                read_activation_key(value)
            except (OSError, ValueError) as e:
                raise StartupParamError(field, str(e)) from None
        elif field == "master_fingerprint":
            from safesquid_tw.cluster.fingerprints import parse_fingerprint

            try:
                parse_fingerprint(value)
            except ValueError as e:
                raise StartupParamError(field, str(e)) from None
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


def pidfile_from_argv(argv: list[str]) -> str | None:
    """The pidfile twistd was told to write (`--pidfile X` / `--pidfile=X`; twistd.pid by default);
    None when there is none (`--pidfile=`)."""
    value = "twistd.pid"
    for i, arg in enumerate(argv):
        if arg == "safesquid":
            break  # the plugin's own options follow
        if arg.startswith("--pidfile="):
            value = arg.split("=", 1)[1]
        elif arg == "--pidfile" and i + 1 < len(argv):
            value = argv[i + 1]
    return value or None


def remove_own_pidfile(argv: list[str], pid: int | None = None) -> str | None:
    """Delete twistd's pidfile if it names this process. The same command, run again by exec in
    this very process, would otherwise find a live pid there (its own) and refuse to start with
    "Another twistd server is running". Returns the path removed, if any."""
    path = pidfile_from_argv(argv)
    if path is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        if int(Path(path).read_text().strip() or "0") != pid:
            return None
        os.unlink(path)
    except (OSError, ValueError):
        return None
    return path


def _exec_same_command(reactor: Any) -> None:
    """Stop cleanly (listeners closed, spool flushed), then run the same command line again in
    this process (same pid, same supervisor); the pidfile that names us is removed first."""
    argv = list(sys.orig_argv) or [sys.executable, *sys.argv]

    def execute() -> None:
        remove_own_pidfile(argv)
        os.execv(sys.executable, argv)

    reactor.addSystemEventTrigger("after", "shutdown", execute)
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
        """Save the editable fields; what "join a cluster" wrote (role, key file) is kept."""
        kept = {k: v for k, v in self.load().items() if k in JOIN_FIELDS and k not in params}
        checked = check_params({**kept, **params})
        atomic_write(self.path, json.dumps(checked, indent=1, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)
        return checked

    def join(self, master: str, activation_key: str, *, fingerprint: str = "", node_name: str = "") -> dict[str, str]:
        """A standalone node's way into a cluster: write the activation key (mode 0600) and the
        startup parameters that make the next start a slave of `master`."""
        _check_master(master.strip())
        key = activation_key.strip().splitlines()[0].strip() if activation_key.strip() else ""
        if not key:
            raise StartupParamError("activation_key", "the cluster's activation key is needed")
        key_path = self.path.parent / KEY_FILE_NAME
        atomic_write(key_path, (key + "\n").encode("utf-8"), mode=0o600)
        return self.save({"role": "slave", "master": master, "activation_key_file": str(key_path),
                          "master_fingerprint": fingerprint, "node_name": node_name})

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


__all__ = ["FIELDS", "JOIN_FIELDS", "StartupParamError", "StartupParams", "check_params", "pidfile_from_argv",
           "read_startup_file", "remove_own_pidfile"]
