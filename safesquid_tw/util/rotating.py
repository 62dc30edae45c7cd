"""An append-only file that rotates by size: `name`, `name.1` (newest) ... `name.N` (oldest).

Shared by the access log and the event log. Unlike `twisted.python.logfile.LogFile` it rotates
*before* a write that would cross the limit (so a file stays under it unless one write alone is
larger), fixes the file mode whatever the umask, and takes no lock: callers that write from more
than one thread bring their own.
"""

from __future__ import annotations

import os


class RotatingFile:
    def __init__(self, path: str, *, rotate_bytes: int, keep: int, mode: int = 0o640) -> None:
        if rotate_bytes <= 0:
            raise ValueError(f"{path}: rotate_bytes must be positive, not {rotate_bytes}")
        if keep < 0:
            raise ValueError(f"{path}: keep must be zero or more, not {keep}")
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.keep = keep  # rotated files kept beside the current one
        self.mode = mode
        self.size = 0
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        """Append all of `data` (opening the file if needed); OSError goes to the caller."""
        if not data:
            return
        if self._fd is None:
            self._open()
        if self.size > 0 and self.size + len(data) > self.rotate_bytes:
            self.rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)  # type: ignore[arg-type]
            self.size += written
            view = view[written:]

    def rotate(self) -> None:
        """Shift `name.i` to `name.i+1`, the current file to `name.1`, and start an empty one."""
        self.close()
        if self.keep == 0:
            _remove_if_present(self.path)
        else:
            for index in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{index}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index + 1}")
            if os.path.exists(self.path):
                os.replace(self.path, f"{self.path}.1")
        # Files left over from a run with a larger `keep`.
        index = self.keep + 1
        while os.path.exists(f"{self.path}.{index}"):
            os.remove(f"{self.path}.{index}")
            index += 1
        self._open()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _open(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            # os.open's mode is filtered by the umask, and an existing file keeps its old mode.
            os.fchmod(fd, self.mode)
            self.size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["RotatingFile"]
