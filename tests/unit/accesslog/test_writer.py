import json
import os
import stat

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.accesslog.writer import AccessLogWriter


def record(n: int, **overrides) -> AccessRecord:
    fields = dict(
        time=1795316839.0 + n,
        node="n1",
        client="10.0.0.1",
        user=None,
        method="GET",
        url=f"http://example.com/{n:03d}",  # equal lengths make sizes predictable
        status=200,
        bytes_in=100,
        bytes_out=1000,
        duration_ms=3.0,
        action="allow",
        rule=None,
        category=None,
        application=None,
        policy_version=1,
    )
    fields.update(overrides)
    return AccessRecord(**fields)


def lines(path):
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def log_path(tmp_path):
    return str(tmp_path / "logs" / "access.log")


def test_records_wait_in_memory_until_the_flush_timer(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock, flush_interval=0.2)
    writer.startService()
    for n in range(3):
        writer.write(record(n))
    assert not os.path.exists(log_path)
    assert writer.pending == 3
    clock.advance(0.2)
    assert [obj["url"] for obj in lines(log_path)] == [f"http://example.com/{n:03d}" for n in range(3)]
    assert writer.pending == 0 and writer.written == 3
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o640
    writer.stopService()


def test_one_batch_is_one_write_call(clock, log_path, monkeypatch):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock)
    writer.startService()
    for n in range(50):
        writer.write(record(n))
    calls = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (calls.append(len(data)), real_write(fd, data))[1])
    clock.advance(0.2)
    clock.advance(0.2)  # nothing pending: no write at all
    assert len(calls) == 1
    assert len(lines(log_path)) == 50
    writer.stopService()


def test_stop_flushes_what_is_pending(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock)
    writer.startService()
    writer.write(record(1))
    writer.stopService()
    assert len(lines(log_path)) == 1
    assert not clock.getDelayedCalls()


def test_records_after_stop_are_written_at_once(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock)
    writer.startService()
    writer.stopService()
    writer.write(record(1))
    assert len(lines(log_path)) == 1


def test_a_burst_beyond_max_pending_is_flushed_without_waiting(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock, max_pending=10)
    writer.startService()
    for n in range(25):
        writer.write(record(n))
    assert len(lines(log_path)) == 20
    assert writer.pending == 5
    writer.stopService()


def test_rotates_at_size_and_keeps_n_files(clock, log_path):
    one_line = len(record(0).to_json_line())
    writer = AccessLogWriter(log_path, rotate_bytes=3 * one_line, keep=2, clock=clock)
    writer.startService()
    for n in range(20):
        writer.write(record(n))
        clock.advance(0.2)
    writer.stopService()
    directory = os.path.dirname(log_path)
    assert sorted(os.listdir(directory)) == ["access.log", "access.log.1", "access.log.2"]
    for name in os.listdir(directory):
        assert os.path.getsize(os.path.join(directory, name)) <= 3 * one_line
    urls = [obj["url"] for name in ("access.log.2", "access.log.1", "access.log")
            for obj in lines(os.path.join(directory, name))]
    assert urls == [f"http://example.com/{n:03d}" for n in range(12, 20)]  # [12-14] [15-17] [18 19]


def test_sinks_see_every_record_and_a_failing_sink_breaks_nothing(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock)
    seen = []

    def broken(_record):
        raise RuntimeError("spool full")

    writer.add_sink(broken)
    writer.add_sink(seen.append)
    writer.startService()
    with capturedLogs() as events:
        for n in range(3):
            writer.write(record(n))
    clock.advance(0.2)
    assert seen == [record(n) for n in range(3)]
    assert writer.sink_errors == 3
    assert len([e for e in events if "log_failure" in e]) == 1  # logged once, then counted
    assert len(lines(log_path)) == 3
    writer.stopService()


def test_an_unwritable_log_drops_and_counts_and_recovers(clock, tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_bytes(b"a file where the directory should be")
    path = str(blocker / "access.log")
    writer = AccessLogWriter(path, rotate_bytes=1 << 20, keep=3, clock=clock)
    writer.startService()
    with capturedLogs() as events:
        writer.write(record(1))
        clock.advance(0.2)
        writer.write(record(2))
        clock.advance(0.2)
        assert writer.dropped == 2 and writer.written == 0
        assert len([e for e in events if e.get("path") == path]) == 1
        blocker.unlink()
        writer.write(record(3))
        clock.advance(0.2)
    assert writer.written == 1
    assert [obj["url"] for obj in lines(path)] == ["http://example.com/003"]
    writer.stopService()


def test_an_unencodable_record_is_dropped_alone(clock, log_path):
    writer = AccessLogWriter(log_path, rotate_bytes=1 << 20, keep=3, clock=clock)
    writer.startService()
    with capturedLogs():
        writer.write(record(1))
        writer.write(record(2, duration_ms=float("nan")))
        writer.write(record(3))
        clock.advance(0.2)
    assert [obj["url"] for obj in lines(log_path)] == ["http://example.com/001", "http://example.com/003"]
    assert writer.dropped == 1
    writer.stopService()
