import os
import re

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from safesquid_tw.eventlog import format_event_line, start_event_log, stop_event_log

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARN|ERROR|CRITICAL) \[[^\]]+\] ")


@pytest.mark.parametrize(
    "event, line",
    [
        (
            {"log_time": 1795316839.7, "log_level": LogLevel.info, "log_namespace": "system",
             "log_format": "policy version {v} active", "v": 7},
            "2026-11-22T03:07:19Z INFO [system] policy version 7 active\n",
        ),
        (
            {"log_time": 0, "log_level": LogLevel.warn, "log_namespace": "ns", "log_system": "cluster",
             "log_format": "master unreachable"},
            "1970-01-01T00:00:00Z WARN [cluster] master unreachable\n",
        ),
        (
            {"log_time": 0, "log_level": LogLevel.error, "log_format": "two\nlines\r\n"},
            "1970-01-01T00:00:00Z ERROR [-] two\n\tlines\\r\n",
        ),
        ({"log_time": 0, "log_level": LogLevel.critical, "log_format": ""}, None),
    ],
)
def test_format(event, line):
    assert format_event_line(event) == line


def test_a_failure_continues_on_tab_indented_lines():
    try:
        raise ValueError("broken thing")
    except ValueError:
        failure = Failure()
    text = format_event_line(
        {"log_time": 0, "log_level": LogLevel.critical, "log_namespace": "x", "log_format": "oops",
         "log_failure": failure}
    )
    first, *rest = text.rstrip("\n").split("\n")
    assert first == "1970-01-01T00:00:00Z CRITICAL [x] oops"
    assert rest and all(line.startswith("\t") for line in rest)
    assert "ValueError: broken thing" in text


def test_messages_of_a_logger_land_in_the_file(tmp_path):
    publisher = LogPublisher()
    path = str(tmp_path / "logs" / "extended.log")
    observer = start_event_log(path, rotate_bytes=1 << 20, keep=2, publisher=publisher)
    log = Logger(namespace="safesquid_tw.test", observer=publisher)
    log.debug("not at the default level")
    log.info("hello {who}", who="<world>")
    log.warn("careful")
    stop_event_log(observer, publisher=publisher)
    log.info("after stop")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 2
    assert all(LINE.match(line) for line in lines)
    assert lines[0].endswith(" INFO [safesquid_tw.test] hello <world>")
    assert lines[1].endswith(" WARN [safesquid_tw.test] careful")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)


def test_min_level_debug_includes_debug(tmp_path):
    publisher = LogPublisher()
    path = str(tmp_path / "extended.log")
    observer = start_event_log(path, rotate_bytes=1 << 20, keep=2, publisher=publisher, min_level=LogLevel.debug)
    Logger(namespace="n", observer=publisher).debug("detail")
    stop_event_log(observer, publisher=publisher)
    assert " DEBUG [n] detail" in open(path).read()


def test_rotation(tmp_path):
    publisher = LogPublisher()
    path = str(tmp_path / "extended.log")
    observer = start_event_log(path, rotate_bytes=200, keep=2, publisher=publisher)
    log = Logger(namespace="n", observer=publisher)
    for i in range(40):
        log.info("message number {i}", i=i)
    stop_event_log(observer, publisher=publisher)
    assert sorted(os.listdir(tmp_path)) == ["extended.log", "extended.log.1", "extended.log.2"]
    assert all(os.path.getsize(tmp_path / name) <= 200 for name in os.listdir(tmp_path))
    assert open(path).read().splitlines()[-1].endswith("message number 39")


def test_registers_with_the_global_publisher_by_default(tmp_path):
    path = str(tmp_path / "extended.log")
    observer = start_event_log(path, rotate_bytes=1 << 20, keep=1)
    try:
        Logger(namespace="global.test").info("seen globally")
    finally:
        stop_event_log(observer)
    Logger(namespace="global.test").info("not seen after stop")
    text = open(path).read()
    assert "[global.test] seen globally" in text
    assert "not seen" not in text


def test_a_write_error_is_counted_not_raised(tmp_path):
    publisher = LogPublisher()
    blocker = tmp_path / "logs"
    blocker.write_bytes(b"not a directory")
    observer = start_event_log(str(blocker / "extended.log"), rotate_bytes=100, keep=1, publisher=publisher)
    Logger(namespace="n", observer=publisher).error("lost")
    assert observer.dropped == 1
    stop_event_log(observer, publisher=publisher)
