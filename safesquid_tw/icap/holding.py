"""A message body held until its scan verdict: in memory up to a bound, then in a temporary file.

Many large downloads in flight must not grow the node's memory, so each body keeps at most
`memory_limit` bytes in memory and spills the rest to an unlinked temporary file (page cache,
freed when closed). The SHA-256 of the body is computed as it arrives, for the verdict cache.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import BinaryIO

DEFAULT_MEMORY_LIMIT = 256 * 1024


class HeldBody:
    def __init__(self, memory_limit: int = DEFAULT_MEMORY_LIMIT, directory: str | None = None) -> None:
        self.memory_limit = memory_limit
        self.directory = directory
        self.size = 0
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._closed = False

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self.size += len(data)
        if self._file is None and len(self._memory) + len(data) <= self.memory_limit:
            self._memory += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix="safesquid-av-")
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.seek(0, 2)
        self._file.write(data)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer only at the end)."""
        if self._file is None:
            return bytes(self._memory[offset : offset + size])
        self._file.seek(offset)
        return self._file.read(size)

    def pieces(self, piece: int = 65536):
        """The whole body, piece by piece (for small bodies and tests)."""
        offset = 0
        while offset < self.size:
            data = self.read(offset, piece)
            if not data:
                return
            offset += len(data)
            yield data

    def close(self) -> None:
        self._closed = True
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["DEFAULT_MEMORY_LIMIT", "HeldBody"]
