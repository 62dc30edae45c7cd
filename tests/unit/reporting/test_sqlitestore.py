"""The master's report store: idempotent, atomic ingest; quarantine; search; prune; roll-ups."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safesquid_tw.reporting import aggregate
from safesquid_tw.reporting.sqlitestore import BLOCKED_ACTIONS, IngestResult, ReportStore, host_of

T0 = 1_800_000_000.0  # an hour boundary (divisible by 3600)


def rec(i: int = 0, **fields: Any) -> bytes:
    base: dict[str, Any] = {
        "ts": T0 + i,
        "node": "ignored",
        "client": "10.0.0.1",
        "user": "alice",
        "method": "GET",
        "url": f"http://www.example.com/{i}",
        "status": 200,
        "bytes_in": 100,
        "bytes_out": 1000,
        "duration_ms": 12.5,
        "action": "allow",
        "rule": None,
        "category": None,
        "application": None,
        "policy_version": 3,
        "dlp": [],
        "detail": None,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path: Path):
    """Opens the store of the backend under test (every call opens the same one again)."""
    opened: list[Any] = []
    if request.param == "sqlite":
        def opener(**kwargs: Any):
            opened.append(ReportStore(tmp_path / "reports.db", **kwargs))
            return opened[-1]
    else:
        from safesquid_tw.reporting.pgstore import PostgresReportStore

        url = request.getfixturevalue("postgres_server").new_database()

        def opener(**kwargs: Any):
            opened.append(PostgresReportStore(url, **kwargs))
            return opened[-1]
    opener.backend = request.param  # type: ignore[attr-defined]
    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store(wall_clock=lambda: T0 + 10_000)


def fail_on_boom(store: Any) -> type[Exception]:
    """Make inserting a record whose URL ends in /boom fail inside the database; return the
    error type the store raises then."""
    if isinstance(store, ReportStore):
        store._writer.execute(
            "CREATE TRIGGER fail_on_boom BEFORE INSERT ON requests WHEN NEW.url LIKE '%/boom'"
            " BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        return sqlite3.IntegrityError
    import psycopg

    with store._write_lock:
        store._connection().execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.url LIKE '%/boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$;"
            " CREATE TRIGGER fail_on_boom BEFORE INSERT ON requests FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    return psycopg.errors.RaiseException


def stop_boom(store: Any) -> None:
    if isinstance(store, ReportStore):
        store._writer.execute("DROP TRIGGER fail_on_boom")
    else:
        with store._write_lock:
            store._connection().execute("DROP TRIGGER fail_on_boom ON requests")


def raw_count(store: ReportStore, sql: str = "SELECT count(*) FROM requests") -> int:
    return store.reader().execute(sql).fetchone()[0]


def rollup_total(store: ReportStore, table: str = "rollup_minute") -> int:
    return store.reader().execute(f"SELECT coalesce(sum(requests), 0) FROM {table}").fetchone()[0]


def test_commits_are_durable_when_acknowledged(store: ReportStore) -> None:
    if not isinstance(store, ReportStore):
        with store._write_lock:
            assert store._connection().execute("SHOW synchronous_commit").fetchone()[0] == "on"
        return
    assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_ingest_stores_a_batch_and_reports_counts(store: ReportStore) -> None:
    result = store.ingest("n1", 7, 0, [rec(i) for i in range(5)])
    assert result == IngestResult(inserted=5, duplicates=0, quarantined=0)
    assert store.count() == 5
    [newest] = store.search(start=T0, end=T0 + 60, limit=1)
    assert (newest["node"], newest["segment"], newest["seq"]) == ("n1", 7, 4)
    assert newest["host"] == "www.example.com"
    assert newest["time"] == T0 + 4
    assert newest["dlp"] == []


def test_same_batch_twice_is_stored_once(store: ReportStore) -> None:
    batch = [rec(i) for i in range(10)]
    store.ingest("n1", 1, 0, batch)
    assert store.ingest("n1", 1, 0, batch) == IngestResult(0, 10, 0)
    assert store.count() == 10
    assert rollup_total(store) == 10
    assert rollup_total(store, "rollup_hour") == 10


def test_overlapping_batches_store_only_the_new_records(store: ReportStore) -> None:
    records = [rec(i) for i in range(15)]
    store.ingest("n1", 1, 0, records[:10])
    assert store.ingest("n1", 1, 5, records[5:15]) == IngestResult(5, 5, 0)
    assert store.count() == 15
    assert rollup_total(store) == 15
    top_users = aggregate.top(store, "user", T0, T0 + 3600)
    assert [(e.key, e.requests) for e in top_users.entries] == [("alice", 15)]


def test_same_sequence_numbers_in_other_segments_or_nodes_are_distinct(store: ReportStore) -> None:
    for node, segment in [("n1", 1), ("n1", 2), ("n2", 1)]:
        assert store.ingest(node, segment, 0, [rec(0), rec(1)]).inserted == 2
    assert store.count() == 6
    assert store.count(node="n2") == 2


def test_a_failure_mid_batch_leaves_nothing(store: ReportStore) -> None:
    error = fail_on_boom(store)
    batch = [rec(0), rec(1), rec(2, url="http://x.test/boom"), rec(3), b"not json"]
    with pytest.raises(error):
        store.ingest("n1", 1, 0, batch)
    assert store.count() == 0
    assert rollup_total(store) == 0
    assert raw_count(store, "SELECT count(*) FROM rollup_top_hour") == 0
    assert store.quarantined() == []
    stop_boom(store)
    assert store.ingest("n1", 1, 0, batch) == IngestResult(4, 0, 1)  # the retry stores it all


def test_a_failing_batch_in_a_shared_commit_leaves_the_others_stored(store: ReportStore) -> None:
    error = fail_on_boom(store)
    results = store.ingest_many(
        [
            ("n1", 1, 0, [rec(0), rec(1)]),
            ("n2", 1, 0, [rec(2), rec(3, url="http://x.test/boom")]),
            ("n3", 1, 0, [rec(4)]),
        ]
    )
    assert results[0] == IngestResult(2, 0, 0)
    assert isinstance(results[1], error)
    assert results[2] == IngestResult(1, 0, 0)
    assert store.count() == 3 and store.count(node="n2") == 0
    assert rollup_total(store) == 3


def test_batches_from_many_threads_are_all_stored_once(store: ReportStore) -> None:
    def ship(node: str) -> None:
        for segment in range(5):
            batch = [rec(i) for i in range(segment * 40, segment * 40 + 40)]
            store.ingest(node, segment, 0, batch)
            store.ingest(node, segment, 20, batch[20:])  # a re-shipped half

    threads = [threading.Thread(target=ship, args=(f"n{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.count() == 4 * 200
    assert rollup_total(store) == 4 * 200
    assert {n: t.requests for n, t in aggregate.per_node(store, T0, T0 + 3600).items()} == {
        f"n{i}": 200 for i in range(4)
    }


def test_batches_waiting_for_a_commit_share_the_next_one(open_store) -> None:
    # (PostgreSQL: one writer connection, so that the three nodes share it.)
    store = open_store(writers=1) if open_store.backend == "postgresql" else open_store()
    commits = []
    real_commit = store._commit

    def counting_commit(group, leader) -> None:
        commits.append(len(group))
        real_commit(group, leader)

    store._commit = counting_commit  # type: ignore[method-assign]
    results: dict[str, IngestResult] = {}

    def ship(node: str) -> None:
        results[node] = store.ingest(node, 1, 0, [rec(0), rec(1)])

    threads = [threading.Thread(target=ship, args=(node,)) for node in ("n1", "n2", "n3")]
    with store._write_lock:  # a commit is being synced: the three batches queue up behind it
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(store._queue) < 3 and time.monotonic() < deadline:
            pass
    for thread in threads:
        thread.join()
    assert commits == [3]
    assert results == {node: IngestResult(2, 0, 0) for node in ("n1", "n2", "n3")}
    assert store.count() == 6


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (rec(ts=None, time=...), "no 'ts'"),
        (rec(ts=None, time="yesterday"), "ISO 8601"),
        (rec(ts="1800000000"), "no 'ts'"),
        (rec(status="200"), "'status'"),
        (rec(bytes_out=-1), "negative"),
        (rec(bytes_in=True), "'bytes_in'"),
        (rec(user=["alice"]), "'user'"),
        (rec(dlp="ssn"), "'dlp'"),
        (rec(duration_ms="fast"), "'duration_ms'"),
        (rec(policy_version=1.5), "'policy_version'"),
    ],
)
def test_malformed_records_are_quarantined_with_the_reason(store: ReportStore, raw: bytes, reason: str) -> None:
    result = store.ingest("n1", 4, 10, [rec(0), raw, rec(2)])
    assert result == IngestResult(2, 0, 1)
    [entry] = store.quarantined()
    assert (entry["node"], entry["segment"], entry["seq"]) == ("n1", 4, 11)
    assert reason in entry["reason"]
    assert entry["raw"] == raw
    assert store.ingest("n1", 4, 10, [rec(0), raw, rec(2)]) == IngestResult(0, 3, 0)
    assert len(store.quarantined()) == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ts": None, "time": "2027-01-15T08:00:00.250Z"}, {"time": 1800000000.25}),
        ({"ts": None, "time": "2027-01-15T08:00:00"}, {"time": 1800000000.0}),  # naive means UTC
        ({"ts": None, "time": "2027-01-15T09:00:00+01:00"}, {"time": 1800000000.0}),
        ({"ts": 1800000000}, {"time": 1800000000.0}),
        ({"user": ..., "rule": ..., "status": ..., "bytes_in": ..., "detail": ...},
         {"user": None, "rule": None, "status": None, "bytes_in": 0, "detail": None}),
        ({"url": "www.example.org:443", "method": "CONNECT"}, {"host": "www.example.org"}),
        ({"url": ...}, {"host": None}),
        ({"dlp": ["ssn", "cards"], "detail": {"k": 1}}, {"dlp": ["ssn", "cards"], "detail": '{"k": 1}'}),
        ({"bytes_out": 5.0}, {"bytes_out": 5}),
    ],
)
def test_tolerated_record_forms(store: ReportStore, fields: dict[str, Any], expected: dict[str, Any]) -> None:
    assert store.ingest("n1", 1, 0, [rec(0, **fields)]).inserted == 1
    [stored] = store.search(start=0, end=T0 * 2)
    assert {k: stored[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://www.Example.COM/path?q=1", "www.example.com"),
        ("https://user:secret@host.test:8443/x", "host.test"),
        ("http://example.com.", "example.com"),
        ("http://[2001:db8::1]:8080/", "2001:db8::1"),
        ("example.net:443", "example.net"),
        ("http://h.test?x=http://other/", "h.test"),
        ("/relative/path", None),
        ("", None),
        (None, None),
    ],
)
def test_host_of(url: str | None, host: str | None) -> None:
    assert host_of(url) == host


def test_dropped_counter_keeps_the_highest_total(store: ReportStore) -> None:
    store.record_dropped("n1", 10)
    store.record_dropped("n2", 3)
    store.record_dropped("n1", 25)
    store.record_dropped("n1", 20)  # a late message from before a reconnect
    assert store.dropped_totals() == {"n1": 25, "n2": 3}


def search_dataset(store: ReportStore) -> None:
    rows = [
        # node, offset, user, client, url, status, action, rule, category
        ("n1", 0, "alice", "10.0.0.1", "http://www.example.com/", 200, "allow", None, "news"),
        ("n1", 10, "bob", "10.0.0.2", "http://example.com/a", 403, "deny", "block-x", None),
        ("n2", 20, "alice", "10.0.0.2", "http://api.example.com/", 200, "allow", None, None),
        ("n2", 30, None, "10.0.0.3", "http://badexample.com/", 200, "allow", None, None),
        ("n1", 40, "carol", "10.0.0.1", "http://x-example.com/", 403, "deny", "block-x", "games"),
        ("n2", 4000, "alice", "10.0.0.1", "example.com:443", 200, "tunnel", None, None),
    ]
    for seq, (node, offset, user, client, url, status, action, rule, category) in enumerate(rows):
        fields = dict(user=user, client=client, url=url, status=status, action=action, rule=rule, category=category)
        store.ingest(node, 1, seq, [rec(offset, **fields)])


@pytest.mark.parametrize(
    ("filters", "offsets"),
    [
        ({}, [4000, 40, 30, 20, 10, 0]),
        ({"start": T0 + 10, "end": T0 + 40}, [30, 20, 10]),
        ({"node": "n2"}, [4000, 30, 20]),
        ({"user": "alice"}, [4000, 20, 0]),
        ({"user": "alice", "end": T0 + 3600}, [20, 0]),
        ({"client": "10.0.0.2"}, [20, 10]),
        ({"domain": "example.com"}, [4000, 20, 10, 0]),
        ({"domain": "Example.COM."}, [4000, 20, 10, 0]),
        ({"domain": "api.example.com"}, [20]),
        ({"domain": "example"}, []),
        ({"rule": "block-x"}, [40, 10]),
        ({"status": 403}, [40, 10]),
        ({"action": "deny", "node": "n1", "user": "carol"}, [40]),
        ({"category": "news"}, [0]),
    ],
)
def test_search_filters(store: ReportStore, filters: dict[str, Any], offsets: list[int]) -> None:
    search_dataset(store)
    window = {"start": T0, "end": T0 + 86400, **filters}
    found = store.search(**window)
    assert [r["time"] - T0 for r in found] == offsets
    assert store.count(**window) == len(offsets)


def test_search_pages_newest_first(store: ReportStore) -> None:
    store.ingest("n1", 1, 0, [rec(i) for i in range(10)])
    pages = [store.search(start=T0, end=T0 + 60, limit=4, offset=o) for o in (0, 4, 8)]
    assert [[r["seq"] for r in page] for page in pages] == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]


def test_search_pages_through_nodes_in_one_order(store: ReportStore) -> None:
    """Newest first, whichever index a store reads: pages of a search without an indexed filter
    put the records of every node together."""
    for n, node in enumerate(("n3", "n1", "n2")):
        for segment in (1, 2):
            store.ingest(node, segment, 0, [rec(i * 6 + n * 2 + segment, action="deny" if i % 2 else "allow")
                                            for i in range(4)])
    expected = sorted(((r["time"], r["node"], r["segment"], r["seq"]) for r in store.search(
        start=T0, end=T0 + 60, limit=100)), reverse=True)
    assert len(expected) == 24 and len({k[0] for k in expected}) == 24
    for filters in ({}, {"action": "deny"}):
        want = [k for k in expected if not filters or k[3] % 2]
        pages = [store.search(start=T0, end=T0 + 60, limit=5, offset=o, **filters) for o in range(0, 25, 5)]
        got = [(r["time"], r["node"], r["segment"], r["seq"]) for page in pages for r in page]
        assert got == want, filters


def test_search_by_an_unindexed_filter_finds_matches_hours_apart(store: ReportStore) -> None:
    """Matches spread over hours (PostgreSQL reads growing windows of the period for them)."""
    store.ingest("n1", 1, 0, [rec(k * 1000, action="deny" if k % 4 == 1 else "allow") for k in range(40)])
    store.ingest("n2", 1, 0, [rec(k * 1000 + 7, action="deny" if k % 4 == 3 else "allow") for k in range(40)])
    want = sorted([k * 1000 for k in range(40) if k % 4 == 1] + [k * 1000 + 7 for k in range(40) if k % 4 == 3],
                  reverse=True)
    for limit, offset in ((3, 0), (3, 2), (50, 0), (5, 15)):
        found = store.search(start=T0, end=T0 + 40_000, action="deny", limit=limit, offset=offset)
        assert [r["time"] - T0 for r in found] == want[offset:offset + limit], (limit, offset)


def test_count_refuses_unknown_filters(store: ReportStore) -> None:
    with pytest.raises(TypeError):
        store.count(usr="alice")


def test_prune_deletes_old_records_in_batches_and_whole_old_buckets(store: ReportStore) -> None:
    store.ingest("n1", 1, 0, [rec(i * 600) for i in range(12)])  # two hours, one every 10 min
    store.ingest("n1", 2, 0, [b"garbage"])  # received at T0 + 10_000
    assert store.prune(T0 + 3900, batch=2) == 7  # 0..3600 are older than T0 + 3900
    assert [r["time"] - T0 for r in store.search(start=0, end=T0 * 2)][-1] == 4200
    assert store.count() == 5
    minutes = [b for (b,) in store.reader().execute("SELECT bucket FROM rollup_minute ORDER BY bucket")]
    assert minutes[0] == T0 + 4200
    hours = [b for (b,) in store.reader().execute("SELECT DISTINCT bucket FROM rollup_top_hour")]
    assert hours == [T0 + 3600]  # straddles the cut: kept
    assert len(store.quarantined()) == 1
    assert store.prune(T0 + 20_000) == 5
    assert store.quarantined() == [] and rollup_total(store) == 0


def random_records(rng: random.Random, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        out.append(
            rec(
                i,
                ts=T0 + rng.uniform(0, 3 * 3600),
                user=rng.choice(["alice", "bob", "carol", None]),
                url=rng.choice(["http://a.test/", "http://b.test/x", "c.test:443", "http://www.a.test/"]),
                action=rng.choice(["allow", "allow", "deny", "block", "tunnel", "auth"]),
                rule=rng.choice([None, "r1", "r2"]),
                category=rng.choice([None, "news", "games"]),
                bytes_in=rng.randrange(0, 5000),
                bytes_out=rng.randrange(0, 50000),
            )
        )
    return out


def test_rollups_agree_with_the_raw_records(store: ReportStore) -> None:
    rng = random.Random(7)
    for node in ("n1", "n2", "n3"):
        records = random_records(rng, 600)
        for first in range(0, 600, 100):
            store.ingest(node, 1, first, records[first : first + 100])
        store.ingest(node, 1, 250, records[250:450])  # a re-shipment must not count twice
    start, end = T0, T0 + 3 * 3600
    raw = store.search(start=start, end=end, limit=10_000)
    assert len(raw) == 1800

    def totals_of(rows: list[dict[str, Any]]) -> aggregate.Totals:
        return aggregate.Totals(
            len(rows),
            sum(r["action"] in BLOCKED_ACTIONS for r in rows),
            sum(r["bytes_in"] for r in rows),
            sum(r["bytes_out"] for r in rows),
        )

    assert aggregate.totals(store, start, end) == totals_of(raw)
    assert aggregate.totals(store, start, end, node="n2") == totals_of([r for r in raw if r["node"] == "n2"])
    assert aggregate.per_node(store, start, end) == {
        n: totals_of([r for r in raw if r["node"] == n]) for n in ("n1", "n2", "n3")
    }
    hourly = aggregate.timeline(store, start, end, step=3600)
    quarter = aggregate.timeline(store, start, end, step=900)
    assert [b.start for b in hourly] == [T0, T0 + 3600, T0 + 7200]
    for buckets in (hourly, quarter):
        step = buckets[1].start - buckets[0].start
        for bucket in buckets:
            rows = [r for r in raw if bucket.start <= r["time"] < bucket.start + step]
            assert bucket.totals == totals_of(rows)
    for dimension, column in (("domain", "host"), ("user", "user"), ("category", "category"), ("rule", "rule")):
        listed = aggregate.top(store, dimension, start, end, limit=100)
        expected: dict[str, list[int]] = {}
        for r in raw:
            if r[column] is not None:
                counts = expected.setdefault(r[column], [0, 0, 0])
                counts[0] += 1
                counts[1] += r["action"] in BLOCKED_ACTIONS
                counts[2] += r["bytes_in"] + r["bytes_out"]
        assert {e.key: [e.requests, e.blocked, e.bytes] for e in listed.entries} == expected
        requests = [e.requests for e in listed.entries]
        assert requests == sorted(requests, reverse=True)


def test_timeline_includes_empty_buckets_and_widens_to_whole_steps(store: ReportStore) -> None:
    store.ingest("n1", 1, 0, [rec(30), rec(7300)])
    buckets = aggregate.timeline(store, T0 + 100, T0 + 7250, step=3600)
    assert [(b.start - T0, b.totals.requests) for b in buckets] == [(0, 1), (3600, 0), (7200, 1)]
    with pytest.raises(ValueError):
        aggregate.timeline(store, T0, T0 + 10, step=90)


def test_top_by_blocked_lists_only_keys_with_blocked_requests(store: ReportStore) -> None:
    store.ingest("n1", 1, 0, [rec(0, user="bob", action="deny"), rec(1), rec(2), rec(3, user="bob", action="block")])
    listed = aggregate.top(store, "user", T0, T0 + 60, by="blocked")
    assert [(e.key, e.blocked) for e in listed.entries] == [("bob", 2)]
    assert listed.period == aggregate.Period(int(T0), int(T0) + 3600)


def test_dashboard_of_the_last_day(store: ReportStore) -> None:
    store.ingest("n1", 1, 0, [rec(0), rec(1, action="deny")])
    store.ingest("n2", 1, 0, [rec(-2 * 86400)])  # older than a day: not on the dashboard
    board = aggregate.dashboard(store, T0 + 3600)
    assert board.totals == aggregate.Totals(2, 1, 200, 2000)
    assert board.totals.allowed == 1
    assert set(board.per_node) == {"n1"}
    assert sum(b.totals.requests for b in board.timeline) == 2
    assert [e.key for e in board.tops["domain"].entries] == ["www.example.com"]


def test_records_survive_reopening_the_store(open_store) -> None:
    first = open_store()
    first.ingest("n1", 1, 0, [rec(0), rec(1)])
    first.close()
    second = open_store()
    assert second.count() == 2
    assert second.ingest("n1", 1, 0, [rec(0), rec(1)]).duplicates == 2
