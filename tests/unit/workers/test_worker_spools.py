"""A worker slot's spool as the node ships it: sealed segments only, ids unique across slots,
deletion by the slot's worker (or by the node for a slot no worker serves), orphan recovery."""

from __future__ import annotations

from safesquid_tw.accesslog.spool import Spool
from safesquid_tw.workers.spools import (
    SLOT_STRIDE, SlotSource, existing_slots, lock_slot, recover_orphan_slot, shipped_segment, slot_directory,
    slot_is_locked,
)


def spool_with(directory, lines, *, seal=True) -> Spool:
    spool = Spool(directory, node="n1")
    for line in lines:
        spool.append(line)
    spool.write_out()
    if seal:
        spool.seal()
    return spool


def test_only_sealed_segments_ship_with_ids_unique_per_slot(tmp_path):
    a, b = slot_directory(tmp_path, 0), slot_directory(tmp_path, 1)
    spool_with(a, [b'{"n":1}', b'{"n":2}'])
    spool_with(b, [b'{"n":3}'])
    open_one = spool_with(a, [b'{"n":4}'], seal=False)  # still open: the worker's, not shipped
    sources = [SlotSource(a, 0, "n1"), SlotSource(b, 1, "n1")]
    shipped = {}
    for source in sources:
        for segment in source.sealed_segments():
            assert segment % SLOT_STRIDE == source.slot
            shipped[segment] = [p for batch in source.read_batches(segment) for p in batch.records]
            assert all(batch.node == "n1" for batch in source.read_batches(segment))
    assert sorted(sum(shipped.values(), [])) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert len(shipped) == 2
    open_one.close()


def test_a_worker_deletes_what_was_shipped_and_a_new_worker_ships_again_what_it_did_not(tmp_path):
    directory = slot_directory(tmp_path, 0)
    spool_with(directory, [b'{"n":1}'])
    asked = []
    source = SlotSource(directory, 0, "n1", ask_delete=lambda local: asked.append(local) or True)
    [segment] = source.sealed_segments()
    source.acknowledge(segment)
    assert asked == [segment // SLOT_STRIDE]
    assert source.sealed_segments() == []  # asked: not shipped again while the worker deletes it
    source.forget_asked()  # that worker died before deleting: its successor's hello
    assert source.sealed_segments() == [segment]


def test_a_slot_without_a_worker_is_recovered_and_deleted_by_the_node(tmp_path):
    directory = slot_directory(tmp_path, 3)
    crashed = spool_with(directory, [b'{"n":1}', b'{"n":2}'], seal=False)  # left open by a killed worker
    del crashed
    assert existing_slots(tmp_path) == [3]
    assert recover_orphan_slot(directory, "n1")
    source = SlotSource(directory, 3, "n1")
    [segment] = source.sealed_segments()
    assert [p for b in source.read_batches(segment) for p in b.records] == [b'{"n":1}', b'{"n":2}']
    source.acknowledge(segment)
    assert source.sealed_segments() == []
    assert not list(directory.glob("*.seg"))


def test_the_slot_lock_keeps_one_writer(tmp_path):
    directory = slot_directory(tmp_path, 0)
    fd = lock_slot(directory)
    assert slot_is_locked(directory)
    assert not recover_orphan_slot(directory, "n1")
    import os

    os.close(fd)
    assert not slot_is_locked(directory)


def test_shipped_ids_stay_above_the_nodes_own_spool_ids(tmp_path):
    own = Spool(tmp_path / "spool", node="n1")
    own.append(b'{"n":1}')
    own.seal()
    [own_id] = own.sealed_segments()
    worker = spool_with(slot_directory(tmp_path, 0), [b'{"n":2}'])
    [local] = worker.sealed_segments()
    assert shipped_segment(local, 0) > own_id + 10**12
    assert shipped_segment(local, 255) < 2**53  # exact in any JSON reader
