"""LogShipper: sealed spool segments go out in batches and are deleted only once every batch was
acknowledged; failures and a missing master cost a resend, never a record. Driven by a
`task.Clock`, with a sender whose answers the test gives; disk work runs inline."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from safesquid_tw.util.threads import inline
from safesquid_tw.accesslog.spool import Batch, Spool
from safesquid_tw.cluster.shipper import LogShipper
from safesquid_tw.reporting.sqlitestore import ReportStore

INTERVAL = 0.5
SEAL_AFTER = 1.0
SEGMENT_BYTES = 1 << 20  # a few thousand records: the tests' records fit in one segment
CAP_BYTES = 8 << 20


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool", node="slave1", segment_bytes=SEGMENT_BYTES, cap_bytes=CAP_BYTES)


def record(i: int, pad: int = 0) -> bytes:
    return json.dumps({"ts": 1795300000.0 + i, "node": "slave1", "method": "GET", "status": 200,
                       "url": f"http://example.test/{i}", "bytes_in": 1, "bytes_out": 2, "action": "allow",
                       "detail": "x" * pad}).encode()


class Sender:
    """Records every batch; each answer is a Deferred the test fires (or `auto` acks at once)."""

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.batches: list[Batch] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, batch: Batch) -> defer.Deferred:
        self.batches.append(batch)
        if self.auto:
            return defer.succeed(len(batch.records))
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def ack(self) -> None:
        self.pending.pop(0).callback(0)

    def fail(self, why: str = "the master went away") -> None:
        self.pending.pop(0).errback(ConnectionError(why))

    def records(self) -> list[bytes]:
        return [r for b in self.batches for r in b.records]


def started(clock: Clock, spool: Spool) -> LogShipper:
    shipper = LogShipper(clock, spool, interval=INTERVAL, seal_after=SEAL_AFTER, in_thread=inline)
    shipper.startService()
    return shipper


def run(clock: Clock, seconds: float, step: float = INTERVAL) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_without_a_sender_records_wait_in_sealed_segments(clock, spool):
    shipper = started(clock, spool)
    for i in range(5):
        spool.append(record(i))
    run(clock, SEAL_AFTER + INTERVAL)
    assert len(spool.sealed_segments()) == 1, "idle records are sealed so they can ship later"
    assert spool.backlog_records == 5
    run(clock, 10)
    assert spool.backlog_records == 5 and shipper.shipped_records == 0


def test_a_sender_gets_everything_in_order_and_the_segment_goes_once_acknowledged(clock, spool):
    shipper = started(clock, spool)
    for i in range(5):
        spool.append(record(i))
    run(clock, SEAL_AFTER + INTERVAL)
    (segment,) = spool.sealed_segments()

    sender = Sender(auto=True)
    shipper.set_sender(sender)  # at once, without waiting for the next tick
    assert [json.loads(r)["url"] for r in sender.records()] == [f"http://example.test/{i}" for i in range(5)]
    assert sender.batches[0] == Batch("slave1", segment, 0, sender.records())
    assert spool.sealed_segments() == [] and spool.backlog_records == 0
    assert shipper.shipped_records == 5


def test_a_segment_stays_until_its_last_batch_is_acknowledged(clock, spool):
    shipper = started(clock, spool)
    for i in range(1200):  # more than one batch (at most 500 records each)
        spool.append(record(i))
    spool.seal()
    sender = Sender()
    shipper.set_sender(sender)
    assert len(sender.batches) == 1
    sender.ack()
    assert len(sender.batches) == 2 and len(spool.sealed_segments()) == 1
    sender.ack()
    assert len(sender.batches) == 3 and len(spool.sealed_segments()) == 1
    sender.ack()
    assert spool.sealed_segments() == [] and shipper.shipped_records == 1200
    assert [b.first_seq for b in sender.batches] == [0, 500, 1000]
    assert all(b.last_seq - b.first_seq + 1 == len(b.records) for b in sender.batches)


def test_batches_stay_within_the_wire_limits(clock, spool):
    shipper = started(clock, spool)
    for i in range(40):
        spool.append(record(i, pad=20_000))  # about 20 KB each
    spool.seal()
    sender = Sender(auto=True)
    shipper.set_sender(sender)
    assert len(sender.records()) == 40
    for batch in sender.batches:
        assert len(batch.records) <= 500
        assert sum(len(r) for r in batch.records) <= 256 * 1024


def test_batch_limits_make_bigger_batches_with_the_same_records(clock, spool):
    """A standalone node stores its own records in bigger batches (assembly/standalone.py)."""
    shipper = started(clock, spool)
    shipper.batch_limits = {"max_records": 5000, "max_bytes": 4 << 20}
    for i in range(1200):
        spool.append(record(i))
    spool.seal()
    sender = Sender()
    shipper.set_sender(sender)
    assert len(sender.batches) == 1 and len(sender.batches[0].records) == 1200
    assert len(spool.sealed_segments()) == 1  # kept until its batch is acknowledged
    sender.ack()
    assert spool.sealed_segments() == [] and shipper.shipped_records == 1200
    assert sender.records() == [record(i) for i in range(1200)]


def test_standalone_batches_fit_a_sealed_segment():
    from safesquid_tw.assembly.standalone import LOCAL_BATCH_LIMITS

    assert LOCAL_BATCH_LIMITS["max_records"] >= 500 and LOCAL_BATCH_LIMITS["max_bytes"] >= 256 * 1024


def test_a_failed_batch_is_sent_again_and_nothing_is_deleted_meanwhile(clock, spool):
    shipper = started(clock, spool)
    for i in range(3):
        spool.append(record(i))
    spool.seal()
    sender = Sender()
    shipper.set_sender(sender)
    sender.fail()
    assert shipper.last_error and "went away" in shipper.last_error
    assert spool.backlog_records == 3 and len(spool.sealed_segments()) == 1

    run(clock, INTERVAL)  # the next tick tries again
    assert len(sender.batches) == 2 and sender.batches[1] == sender.batches[0]
    sender.ack()
    assert spool.backlog_records == 0 and shipper.last_error is None


def test_no_sender_mid_segment_stops_shipping_and_keeps_the_segment(clock, spool):
    shipper = started(clock, spool)
    for i in range(1200):
        spool.append(record(i))
    spool.seal()
    sender = Sender()
    shipper.set_sender(sender)
    sender.ack()  # first batch stored
    shipper.set_sender(None)  # the master is gone before the second is answered
    sender.fail()
    run(clock, 5)
    assert len(sender.batches) == 2
    assert spool.backlog_records == 1200, "a partly shipped segment is kept whole"


def test_every_record_is_stored_exactly_once_through_failures_and_restarts(clock, tmp_path):
    store = ReportStore(tmp_path / "reports.sqlite3")
    spool = Spool(tmp_path / "spool", node="slave1", segment_bytes=SEGMENT_BYTES, cap_bytes=CAP_BYTES)
    shipper = started(clock, spool)
    for i in range(1100):
        spool.append(record(i))
    spool.seal()
    calls = []

    def stored_but_ack_lost(batch: Batch) -> defer.Deferred:
        store.ingest(batch.node, batch.segment, batch.first_seq, batch.records)
        calls.append(batch.first_seq)
        if len(calls) == 2:
            return defer.fail(ConnectionError("connection lost before the acknowledgement"))
        return defer.succeed(len(batch.records))

    shipper.set_sender(stored_but_ack_lost)
    assert calls == [0, 500] and spool.backlog_records == 1100

    # The node restarts: its spool is opened again from disk, and shipping starts over.
    shipper.stopService()
    spool = Spool(tmp_path / "spool", node="slave1", segment_bytes=SEGMENT_BYTES, cap_bytes=CAP_BYTES)
    shipper = started(clock, spool)
    shipper.set_sender(lambda b: defer.succeed(store.ingest(b.node, b.segment, b.first_seq, b.records).inserted))
    assert spool.backlog_records == 0
    assert store.count() == 1100
    urls = [row[0] for row in store.reader().execute("SELECT url FROM requests")]
    assert len(set(urls)) == 1100


def test_stopping_waits_for_the_batch_in_flight_and_keeps_unshipped_records(clock, spool, tmp_path):
    shipper = started(clock, spool)
    for i in range(3):
        spool.append(record(i))
    spool.seal()
    sender = Sender()
    shipper.set_sender(sender)
    spool.append(record(99))  # arrives while the batch is out

    stopped = []
    shipper.stopService().addBoth(stopped.append)
    assert stopped == [], "stopping waits for the answer in flight"
    sender.ack()
    assert stopped == [None]
    assert not shipper.running

    reopened = Spool(tmp_path / "spool", node="slave1", segment_bytes=SEGMENT_BYTES, cap_bytes=CAP_BYTES)
    assert reopened.backlog_records == 1, "the record that arrived last is on disk, waiting"
    run(clock, 5)
    assert len(sender.batches) == 1, "a stopped shipper sends nothing more"
