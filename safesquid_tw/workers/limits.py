"""`--max-connections` and `--max-connections-per-client` for the node, not per worker.

All workers accept from one kernel queue, so which worker gets a client's next connection is the
kernel's choice: a per-worker count would let a client open N times its limit. The node's parent
therefore creates one small shared table (a file in the state directory's run/ that every worker
maps) and each worker counts its open connections in it:

- `totals`: one 64-bit count per worker slot, written only by that slot; the node's open
  connections are their sum (read without a lock: a moment's race can admit a few over the
  limit, never lose a count).
- per client: 8-way buckets of (client key, one 32-bit count per slot). A bucket is changed under
  an fcntl byte-range lock on that bucket alone, so the check and the increment are one step for
  the node: two workers cannot both admit a client's last allowed connection. A client key is a
  16-byte BLAKE2 digest of its address.
- A slot's counts are cleared when a worker starts in it (its predecessor may have died with
  connections counted); counts are per slot, so a dead worker's stale counts never mix with the
  others'.
- A bucket whose 8 ways all hold other clients with open connections does not refuse: the worker
  then counts that client on its own (per worker, as without this table) and logs it once.

Why not the alternatives: handing every accepted socket from the parent to a worker (SCM_RIGHTS)
makes the parent a second hop on every connection and a single point of failure for accepting;
dividing the limits among workers cannot hold a per-client limit (the kernel does not spread one
client's connections evenly). The table costs two fcntl calls per connection open and close.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from pathlib import Path

from twisted.logger import Logger

log = Logger()

BUCKETS = 8192
WAYS = 8
KEY_BYTES = 16
_EMPTY = bytes(KEY_BYTES)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def table_size(slots: int) -> int:
    entries = BUCKETS * WAYS
    return 8 * slots + KEY_BYTES * entries + 4 * slots * entries


def create_table(path: Path, slots: int) -> None:
    """A fresh, zeroed table (the parent, at every start: workers of an earlier node keep the
    file they mapped, which is unlinked here)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, table_size(slots))  # sparse: pages cost memory only once touched
    finally:
        os.close(fd)


class NodeCounts:
    """One worker's view of the node's shared connection counts."""

    def __init__(self, path: Path | str, slots: int, slot: int) -> None:
        self.slots, self.slot = slots, slot
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, table_size(slots))
        self._keys_at = 8 * slots
        self._counts_at = self._keys_at + KEY_BYTES * BUCKETS * WAYS
        self._column = self._counts_at + 4 * slot * BUCKETS * WAYS
        self._own_total = 0
        self._local: dict[str, int] = {}  # clients whose bucket was full: counted here only
        self._full_logged = False
        self.clear_own()

    def clear_own(self) -> None:
        """This slot's counts to zero (its previous worker's connections died with it)."""
        size = 4 * BUCKETS * WAYS
        self._map[self._column:self._column + size] = bytes(size)
        self._set_total(0)

    # -- node-wide total ------------------------------------------------------------------
    def total(self) -> int:
        return sum(_U64.unpack_from(self._map, 8 * s)[0] for s in range(self.slots))

    def _set_total(self, value: int) -> None:
        self._own_total = value
        _U64.pack_into(self._map, 8 * self.slot, value)

    # -- per client -------------------------------------------------------------------------
    def open(self, ip: str, limit: int) -> int | None:
        """Count a new connection from `ip` unless it already has `limit` open on the node;
        returns None when admitted, else the count it has."""
        key = _key(ip)
        bucket = _bucket(key)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, bucket)
        try:
            way = self._find(bucket, key, claim=True)
            if way is None:
                return self._open_local(ip, limit)
            count = self._sum(way)
            if count >= limit:
                return count
            self._add(way, 1)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, bucket)
        self._set_total(self._own_total + 1)
        return None

    def close(self, ip: str) -> None:
        self._set_total(max(0, self._own_total - 1))
        local = self._local.get(ip)
        if local is not None:
            if local > 1:
                self._local[ip] = local - 1
            else:
                del self._local[ip]
            return
        key = _key(ip)
        bucket = _bucket(key)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, bucket)
        try:
            way = self._find(bucket, key, claim=False)
            if way is not None and self._own(way) > 0:
                self._add(way, -1)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, bucket)

    def count(self, ip: str) -> int:
        """Connections `ip` has open on the node (for tests and /health)."""
        way = self._find(_bucket(_key(ip)), _key(ip), claim=False)
        return (self._sum(way) if way is not None else 0) + self._local.get(ip, 0)

    def _open_local(self, ip: str, limit: int) -> int | None:
        if not self._full_logged:
            self._full_logged = True
            log.warn("the node's connection table has no room for client {client}: its connections are "
                     "counted per worker", client=ip)
        count = self._local.get(ip, 0)
        if count >= limit:
            return count
        self._local[ip] = count + 1
        self._set_total(self._own_total + 1)
        return None

    def _find(self, bucket: int, key: bytes, *, claim: bool) -> int | None:
        first = bucket * WAYS
        free = None
        for way in range(first, first + WAYS):
            at = self._keys_at + KEY_BYTES * way
            held = self._map[at:at + KEY_BYTES]
            if held == key:
                return way
            if free is None and (held == _EMPTY or self._sum(way) == 0):
                free = way
        if not claim or free is None:
            return None
        at = self._keys_at + KEY_BYTES * free
        self._map[at:at + KEY_BYTES] = key
        return free

    def _sum(self, way: int) -> int:
        step = 4 * BUCKETS * WAYS
        at = self._counts_at + 4 * way
        return sum(_U32.unpack_from(self._map, at + step * s)[0] for s in range(self.slots))

    def _own(self, way: int) -> int:
        return _U32.unpack_from(self._map, self._column + 4 * way)[0]

    def _add(self, way: int, delta: int) -> None:
        at = self._column + 4 * way
        _U32.pack_into(self._map, at, max(0, _U32.unpack_from(self._map, at)[0] + delta))

    def close_table(self) -> None:
        self._map.close()
        os.close(self._fd)


def _key(ip: str) -> bytes:
    key = hashlib.blake2b(ip.encode("utf-8", "replace"), digest_size=KEY_BYTES).digest()
    return key if key != _EMPTY else b"\x01" + key[1:]


def _bucket(key: bytes) -> int:
    return int.from_bytes(key[:4], "little") % BUCKETS


__all__ = ["NodeCounts", "create_table", "table_size"]
