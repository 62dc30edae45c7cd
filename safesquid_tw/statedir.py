"""Is the state directory usable? One clear sentence at startup instead of a traceback later.

The node keeps its keys, policy versions, spool and logs in `--state-dir`; a directory that
cannot be created, entered or written (read-only file system, another user's directory, a file
in the way) is reported by the option parser, before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path

SUBDIRS = ("logs", "run", "policy")


def state_dir_problem(path: str) -> str | None:
    """None when `path` can hold the node's state (creating it if needed), else why not."""
    root = Path(path)
    step = "create"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        step = "write into"
        for sub in SUBDIRS:
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        probe = root / "run" / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
        step = "read"
        os.listdir(root / "policy")
    except OSError as e:
        reason = e.strerror or str(e)
        return (f"--state-dir {path}: cannot {step} it ({reason}); the node keeps its keys, policy and logs "
                "there: give it a directory this user may write")
    return None


__all__ = ["state_dir_problem"]
