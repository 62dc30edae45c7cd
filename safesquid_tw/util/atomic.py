"""Replace a file's content so that a crash leaves either the old or the new content, never a mix.

`FilePath.setContent` renames but does not fsync, so after a power loss the new name may point
at an empty file. Here the data is synced before the rename and the directory after it.
"""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike[str], data: bytes | list[bytes], mode: int = 0o600) -> None:
    """Write `data` (bytes, or a list of pieces written one after the other) to `path`
    atomically and durably, with permissions `mode`.

    The temporary file lives in the same directory (a rename is only atomic within one file
    system) and gets its final mode before any byte is written, so secrets are never readable
    by others, not even for a moment.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1  # owned by the file object now
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # The rename is only durable once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = ["atomic_write"]
