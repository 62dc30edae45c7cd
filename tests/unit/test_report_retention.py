"""Old records leave the report store in the background, at start and then hourly."""

import json
import time
import types

import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import defer, reactor, task

from safesquid_tw.config import NodeConfig
from safesquid_tw.node import NodeBase
from safesquid_tw.reporting.store import ReportStore


def record(ts: float, url: str) -> bytes:
    return json.dumps({"ts": ts, "node": "n1", "client": "10.0.0.1", "method": "GET", "url": url,
                       "status": 200, "bytes_in": 1, "bytes_out": 2, "duration_ms": 1.0,
                       "action": "allow"}).encode()


@pytest_twisted.inlineCallbacks
def test_records_past_the_retention_go_and_newer_ones_stay(tmp_path):
    store = ReportStore(tmp_path / "reports.sqlite3")
    now = time.time()
    store.ingest("n1", 1, 0, [record(now - 10 * 86400, "http://old.test/"), record(now - 3600, "http://new.test/")])
    clock = task.Clock()
    base = types.SimpleNamespace(config=NodeConfig(report_retention_days=7), reactor=clock, top=MultiService())
    NodeBase.report_retention(base, store)
    base.top.startService()  # the first run is at start-up; the work itself runs in a thread
    for _ in range(100):
        if store.count(start=0, end=now + 1) == 1:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    assert [r["url"] for r in store.search(start=0, end=now + 1)] == ["http://new.test/"]
    yield defer.maybeDeferred(base.top.stopService)
    store.close()
