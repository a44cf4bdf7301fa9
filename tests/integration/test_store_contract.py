"""One contract for every job store: memory, SQLite and PostgreSQL pass the same tests.

Then what only one backend has: SQLite's WAL and lock handling, PostgreSQL's concurrent
consumers and lost connections, and a property that SQLite and memory agree on any input.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.state import JobEvent, Outcome
from consumers.store import Cursor, JobSummary, PageQuery, Store, StoreError, StoreUnavailable
from consumers.store.factory import open_store, redact_url
from consumers.store.memory import MemoryStore
from consumers.store.postgres import PostgresStore
from consumers.store.postgres import page_statement as pg_page_statement
from consumers.store.sqlite import SqliteStore
from consumers.store.sqlite import page_statement as sqlite_page_statement
from schemas.codes import Action, JobStatus
from tests.strategies import (
    JOB_IDS,
    T0,
    batched,
    lifecycle,
    redelivered,
    ticking_clock,
    transition,
)

S = JobStatus
Clock = Callable[[], datetime]


@dataclass
class Backend:
    """One store implementation under test: how to open it, and raw SQL access to it."""

    kind: str
    url: str
    opened: list[Store] = field(default_factory=list)

    def open(self, clock: Clock | None = None) -> Store:
        store = open_store(self.url, clock=clock or ticking_clock())
        self.opened.append(store)
        return store

    def execute(self, sql: str) -> None:
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as conn, conn:
                conn.execute(sql)
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql.encode())


POSTGRES = pytest.param("postgres", marks=pytest.mark.integration)


def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("pg_store_url")
    found = Backend(kind, url)
    yield found
    for store in found.opened:
        store.close()


@pytest.fixture(params=["memory", "sqlite", POSTGRES])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Every store implementation."""
    yield from _backend(request, tmp_path)


@pytest.fixture(params=["sqlite", POSTGRES])
def persistent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The stores that keep their data (and a schema version) across opens."""
    yield from _backend(request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


# ---- apply / get / list ---------------------------------------------------------------------


def test_get_of_an_unknown_job_is_none(store: Store) -> None:
    assert store.get("never-seen") is None


def test_apply_then_get(store: Store) -> None:
    start = lifecycle(status=S.RUNNING, sites=["site-1", "site-2"])
    fail = transition(site="site-2", action=Action.FAIL)

    results = store.apply_batch([start, fail])

    view = store.get("job-a")
    assert view is not None
    assert (view.status, view.sites) == (S.FINISHED_EXECUTION_EXCEPTION, ("site-1", "site-2"))
    assert view.history == tuple(r.row for r in results)
    assert [r.duplicate for r in results] == [False, False]
    assert view.updated_at == T0
    row = view.history[1]
    assert (row.kind, row.site, row.code, row.return_code, row.action) == (
        "transition",
        "site-2",
        "EXCEPTION",
        101,
        "fail",
    )
    assert row.policy == fail.policy


def test_server_status_is_the_first_finished_lifecycle_applied_or_not(store: Store) -> None:
    # exitpipe's policy fails job-a first; the server then says ABNORMAL, and later COMPLETED.
    store.apply_batch(
        [
            lifecycle(status=S.RUNNING),
            transition(),
            lifecycle(status=S.FINISHED_ABNORMAL),
            lifecycle(status=S.FINISHED_COMPLETED),
            lifecycle(job_id="job-b", status=S.RUNNING),
            lifecycle(job_id="job-b", status=S.FINISHED_COMPLETED),
            lifecycle(job_id="job-c", status=S.RUNNING),
        ]
    )
    a, b, c = (store.get(j) for j in ("job-a", "job-b", "job-c"))
    assert a is not None and b is not None and c is not None
    assert (a.status, a.server_status) == (S.FINISHED_EXECUTION_EXCEPTION, S.FINISHED_ABNORMAL)
    assert a.as_json()["server_status"] == "FINISHED:ABNORMAL"
    assert (b.status, b.server_status) == (S.FINISHED_COMPLETED, S.FINISHED_COMPLETED)
    assert c.server_status is None and c.as_json()["server_status"] is None
    listed = {j.job_id: j for j in store.list()}
    assert listed["job-a"].server_status is S.FINISHED_ABNORMAL
    assert listed["job-c"].as_json()["server_status"] is None
    assert [j.job_id for j in store.list(disagreements=True)] == ["job-a"]
    assert store.list(status=S.FINISHED_COMPLETED, disagreements=True) == []


def test_a_transition_takes_the_job_to_its_rules_status(store: Store) -> None:
    abnormal = transition().model_copy(update={"target_status": S.FINISHED_ABNORMAL})
    store.apply_batch([lifecycle(status=S.RUNNING), abnormal])
    view = store.get("job-a")
    assert view is not None and view.status is S.FINISHED_ABNORMAL
    assert view.history[-1].status_after is S.FINISHED_ABNORMAL


def test_show_json_shape(store: Store) -> None:
    store.apply_batch([lifecycle(status=S.SUBMITTED, sites=["site-1"]), transition()])

    view = store.get("job-a")

    assert view is not None
    shown = view.as_json()
    assert (shown["job_id"], shown["status"], shown["sites"]) == (
        "job-a",
        "FINISHED:EXECUTION_EXCEPTION",
        ["site-1"],
    )
    rows = shown["history"]
    assert isinstance(rows, list)
    assert rows[0]["policy"] is None and rows[0]["return_code"] is None
    assert rows[1]["policy"] == {"name": "nvflare-2.8", "version": "1", "rule": "fail-on-exception"}
    assert rows[1]["recorded_at"] == "2026-01-31T12:00:00Z"


def test_times_come_back_in_utc_at_the_same_instant(store: Store) -> None:
    plus_two = datetime(2026, 3, 1, 14, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    [applied] = store.apply_batch([transition(occurred_at=plus_two)])

    view = store.get("job-a")

    assert view is not None
    stored = view.history[0].occurred_at
    assert stored == plus_two and stored.utcoffset() == timedelta(0)
    assert applied.row == view.history[0]


def test_a_duplicate_is_counted_and_adds_no_row(store: Store) -> None:
    fail = transition()
    store.apply_batch([fail])
    before = store.get("job-a")

    [second] = store.apply_batch([fail])
    [third] = store.apply_batch([fail])

    view = store.get("job-a")
    assert view is not None and before is not None
    assert (second.duplicate, second.row.duplicates) == (True, 1)
    assert (third.duplicate, third.row.duplicates) == (True, 2)
    assert len(view.history) == 1 and view.history[0].duplicates == 2
    assert (view.status, view.updated_at) == (before.status, before.updated_at)
    assert third.row.event_id == str(fail.event_id)


def test_an_id_seen_under_another_job_is_a_duplicate(store: Store) -> None:
    fail = transition(job_id="job-a")
    store.apply_batch([fail])

    [again] = store.apply_batch([transition(job_id="job-b", event_id=fail.event_id)])

    assert again.duplicate and again.row.job_id == "job-a"
    assert store.get("job-b") is None
    assert [s.job_id for s in store.list()] == ["job-a"]


def test_a_batch_sees_its_own_earlier_writes(store: Store) -> None:
    events: list[JobEvent] = [
        lifecycle(status=S.SUBMITTED, sites=["site-1"]),
        lifecycle(status=S.RUNNING),
        transition(site="site-9"),
        transition(site="site-1", action=Action.STOP),
        transition(site="site-1", action=Action.FAIL),
    ]
    fail_again = events[-1]

    results = store.apply_batch([*events, fail_again])

    outcomes = [r.row.outcome for r in results[:-1]]
    assert outcomes == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.IGNORED_FOREIGN_SITE,
        Outcome.APPLIED,
        Outcome.IGNORED_TERMINAL,
    ]
    assert [r.row.status_before for r in results[:-1]] == [
        None,
        S.SUBMITTED,
        S.RUNNING,
        S.RUNNING,
        S.FINISHED_ABORTED,
    ]
    assert (results[-1].duplicate, results[-1].row.duplicates) == (True, 1)
    view = store.get("job-a")
    assert view is not None
    assert len(view.history) == 5 and view.status == S.FINISHED_ABORTED


def test_a_failing_batch_keeps_nothing(store: Store) -> None:
    good = lifecycle(job_id="job-a", status=S.RUNNING)

    with pytest.raises(Exception):  # noqa: B017 - any error must roll the whole batch back
        store.apply_batch([good, object()])  # type: ignore[list-item]

    assert store.get("job-a") is None
    assert store.apply_batch([good])[0].duplicate is False


def test_history_is_oldest_first(store: Store) -> None:
    ids = [uuid.UUID(int=n) for n in (9, 3, 7, 1)]  # ids out of order: order is by arrival
    store.apply_batch([lifecycle(status=S.SUBMITTED, event_id=ids[0])])
    store.apply_batch([lifecycle(status=S.DISPATCHED, event_id=ids[1])])
    store.apply_batch([lifecycle(job_id="job-b", event_id=uuid.uuid4())])
    store.apply_batch([lifecycle(status=S.RUNNING, event_id=ids[2]), transition(event_id=ids[3])])

    view = store.get("job-a")

    assert view is not None
    assert [r.event_id for r in view.history] == [str(i) for i in ids]
    assert [r.recorded_at for r in view.history] == [T0, T0 + _s(1), T0 + _s(3), T0 + _s(3)]


def test_list_orders_by_update_and_filters_by_status(store: Store) -> None:
    store.apply_batch([lifecycle(job_id="job-a", status=S.RUNNING)])
    store.apply_batch([lifecycle(job_id="job-b", status=S.SUBMITTED)])
    store.apply_batch([lifecycle(job_id="job-c", status=S.RUNNING)])
    store.apply_batch([transition(job_id="job-b")])
    store.apply_batch([lifecycle(job_id="job-a", status=S.SUBMITTED)])  # ignored, still a row

    everything = store.list()

    assert [(s.job_id, s.status, s.updated_at) for s in everything] == [
        ("job-c", S.RUNNING, T0 + _s(2)),
        ("job-b", S.FINISHED_EXECUTION_EXCEPTION, T0 + _s(3)),
        ("job-a", S.RUNNING, T0 + _s(4)),
    ]
    assert [s.job_id for s in store.list(status=S.RUNNING)] == ["job-c", "job-a"]
    assert store.list(status=S.FINISHED_ABORTED) == []
    assert [s.job_id for s in store.list(limit=2)] == ["job-c", "job-b"]
    assert [s.job_id for s in store.list(status=S.RUNNING, limit=1)] == ["job-c"]
    assert store.list(limit=0) == []


def test_a_negative_limit_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="limit"):
        store.list(limit=-1)


def test_an_empty_batch_does_nothing(store: Store) -> None:
    assert store.apply_batch([]) == []
    assert store.list() == []


# ---- pages (the dashboard) ------------------------------------------------------------------


def _after(job: JobSummary) -> Cursor:
    return Cursor(job.updated_at, job.job_id)


def _ids(jobs: list[JobSummary]) -> list[str]:
    return [j.job_id for j in jobs]


def test_pages_list_the_newest_update_first_and_go_on_after_a_cursor(store: Store) -> None:
    for job_id in ("job-a", "job-b", "job-c", "job-d"):
        store.apply_batch([lifecycle(job_id=job_id, status=S.RUNNING)])
    store.apply_batch([lifecycle(job_id="job-b", status=S.FINISHED_COMPLETED)])

    first = store.page(PageQuery(size=2))
    second = store.page(PageQuery(size=2, after=_after(first[-1])))
    third = store.page(PageQuery(size=2, after=_after(second[-1])))

    assert (_ids(first), _ids(second), _ids(third)) == (["job-b", "job-d"], ["job-c", "job-a"], [])
    assert first[0] == next(j for j in store.list() if j.job_id == "job-b")
    assert store.page(PageQuery(size=0)) == []


def test_jobs_updated_together_page_in_job_id_order(store: Store) -> None:
    store.apply_batch([lifecycle(job_id=j) for j in ("job-b", "job-c", "job-a", "job-B")])

    assert _ids(store.page(PageQuery())) == ["job-c", "job-b", "job-a", "job-B"]
    first = store.page(PageQuery(size=2))
    assert _ids(store.page(PageQuery(after=_after(first[-1])))) == ["job-a", "job-B"]


def test_pages_filter_by_status_and_disagreement(store: Store) -> None:
    store.apply_batch(
        [
            lifecycle(job_id="job-a", status=S.RUNNING),
            transition(job_id="job-a"),
            lifecycle(job_id="job-a", status=S.FINISHED_ABNORMAL),  # the server disagrees
            lifecycle(job_id="job-b", status=S.RUNNING),
            transition(job_id="job-c"),
            lifecycle(job_id="job-c", status=S.FINISHED_EXECUTION_EXCEPTION),  # agrees
        ]
    )

    assert _ids(store.page(PageQuery(status=S.RUNNING))) == ["job-b"]
    disagreeing = store.page(PageQuery(disagreements=True))
    assert _ids(disagreeing) == ["job-a"] and disagreeing[0].disagrees
    assert disagreeing[0].server_status is S.FINISHED_ABNORMAL
    assert store.page(PageQuery(status=S.RUNNING, disagreements=True)) == []
    failed = PageQuery(status=S.FINISHED_EXECUTION_EXCEPTION)
    assert _ids(store.page(failed)) == ["job-c", "job-a"]


def test_a_prefix_finds_job_ids_in_id_order(store: Store) -> None:
    ids = ["run-10", "run-2", "run-1", "run-1:retry", "other-1", "run-"]
    store.apply_batch([lifecycle(job_id=j) for j in ids])
    store.apply_batch([lifecycle(job_id="run-2", status=S.FINISHED_COMPLETED)])

    assert _ids(store.page(PageQuery(prefix="run-1"))) == ["run-1", "run-10", "run-1:retry"]
    first = store.page(PageQuery(prefix="run-", size=2))
    rest = store.page(PageQuery(prefix="run-", size=10, after=_after(first[-1])))
    assert _ids(first) + _ids(rest) == ["run-", "run-1", "run-10", "run-1:retry", "run-2"]
    assert _ids(store.page(PageQuery(prefix="run-", status=S.FINISHED_COMPLETED))) == ["run-2"]
    assert _ids(store.page(PageQuery(prefix="other-1"))) == ["other-1"]
    for nothing in ("run-3", "RUN", "run-1%", "run_1", "<script>", "x" * 129):
        assert store.page(PageQuery(prefix=nothing)) == [], nothing


def test_upgrading_a_version_1_store_fills_in_the_server_verdicts(persistent: Backend) -> None:
    store = persistent.open()
    store.apply_batch(
        [
            transition(job_id="job-a"),
            lifecycle(job_id="job-a", status=S.FINISHED_ABORTED),
            lifecycle(job_id="job-a", status=S.FINISHED_COMPLETED),
            lifecycle(job_id="job-b", status=S.RUNNING),
        ]
    )
    store.close()
    for sql in _BACK_TO_VERSION_1[persistent.kind]:
        persistent.execute(sql)

    upgraded = persistent.open()

    assert isinstance(upgraded, SqliteStore | PostgresStore) and upgraded.schema_version() == 2
    assert _ids(upgraded.page(PageQuery(disagreements=True))) == ["job-a"]
    listed = {j.job_id: j.server_status for j in upgraded.list()}
    assert listed == {"job-a": S.FINISHED_ABORTED, "job-b": None}


_V2_INDEXES = ("jobs_status_page", "jobs_updated", "jobs_disagree")
_BACK_TO_VERSION_1 = {
    "sqlite": [
        *(f"DROP INDEX {name}" for name in _V2_INDEXES),
        "ALTER TABLE jobs DROP COLUMN server_status",
        "CREATE INDEX jobs_status_updated ON jobs (status, updated_at)",
        "DELETE FROM schema_version WHERE version = 2",
    ],
    "postgres": [
        *(f"DROP INDEX {name}" for name in (*_V2_INDEXES, "jobs_id_c")),
        "ALTER TABLE jobs DROP COLUMN server_status",
        "CREATE INDEX jobs_status_updated ON jobs (status, updated_at)",
        "DELETE FROM schema_version WHERE version = 2",
    ],
}


# ---- schema versions ------------------------------------------------------------------------


def test_reopening_keeps_jobs_and_the_schema_version(persistent: Backend) -> None:
    first = persistent.open()
    first.apply_batch([transition()])
    first.close()

    second = persistent.open()

    view = second.get("job-a")
    assert view is not None and view.status == S.FINISHED_EXECUTION_EXCEPTION
    assert second.apply_batch([lifecycle()])[0].row.outcome == Outcome.IGNORED_TERMINAL
    assert isinstance(second, SqliteStore | PostgresStore)
    assert second.schema_version() == 2


def test_a_newer_schema_version_is_refused(persistent: Backend) -> None:
    persistent.open().close()
    persistent.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, '2030-01-01')")

    with pytest.raises(StoreError, match="schema version 99") as caught:
        persistent.open()

    assert not isinstance(caught.value, StoreUnavailable)


def test_a_closed_store_refuses_calls(persistent: Backend) -> None:
    store = persistent.open()
    store.close()
    store.close()  # twice is fine

    with pytest.raises(StoreError, match="closed"):
        store.get("job-a")


# ---- the factory ----------------------------------------------------------------------------


def test_sqlite_urls_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///relative.db")
    absolute = open_store(f"sqlite:///{tmp_path}/sub.db")  # sqlite:////tmp/... (four slashes)
    try:
        assert isinstance(relative, SqliteStore) and isinstance(absolute, SqliteStore)
        assert (tmp_path / "relative.db").exists() and (tmp_path / "sub.db").exists()
    finally:
        relative.close()
        absolute.close()


def test_memory_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


@pytest.mark.parametrize(
    "url", ["mysql://root:hunter2@db/x", "sqlite://", "sqlite:///", "redis://:hunter2@h/0", ""]
)
def test_unsupported_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert (
        redact_url("postgresql://h/db?password=s3cret&x=1") == "postgresql://h/db?password=***&x=1"
    )
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_an_unreachable_postgres_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        open_store("postgresql://postgres:s3cret@127.0.0.1:1/test?connect_timeout=2")
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


# ---- SQLite only ----------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"))
    try:
        with sqlite3.connect(tmp_path / "jobs.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_a_locked_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"), busy_timeout=0.1)
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable) as caught:
            store.apply_batch([transition()])
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        other.execute("ROLLBACK")
        assert store.apply_batch([transition()])[0].duplicate is False
    finally:
        other.close()
        store.close()


def test_an_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open"):
        SqliteStore(str(tmp_path / "no-such-dir" / "jobs.db"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=redelivered(), data=st.data())
def test_sqlite_and_memory_agree(events: list[JobEvent], data: st.DataObject) -> None:
    batches = data.draw(batched(events))
    memory = MemoryStore(clock=ticking_clock())
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteStore(f"{tmp}/jobs.db", clock=ticking_clock())
        try:
            for batch in batches:
                assert sqlite.apply_batch(batch) == memory.apply_batch(batch)
            assert [sqlite.get(j) for j in JOB_IDS] == [memory.get(j) for j in JOB_IDS]
            assert sqlite.list() == memory.list()
            for query in (
                PageQuery(size=100),
                PageQuery(disagreements=True),
                PageQuery(prefix="job-"),
            ):
                assert sqlite.page(query) == memory.page(query)
        finally:
            sqlite.close()


# ---- PostgreSQL only ------------------------------------------------------------------------


def _job_events(job_id: str, terminal: JobEvent) -> list[JobEvent]:
    """A job's lifecycle, all naming the same sites, and exactly one terminal cause."""
    sites = ["site-1", "site-2"]
    return [
        lifecycle(job_id, S.SUBMITTED, sites),
        lifecycle(job_id, S.DISPATCHED, sites),
        lifecycle(job_id, S.RUNNING, sites),
        terminal,
    ]


def _workload(jobs: int) -> list[JobEvent]:
    events: list[JobEvent] = []
    for n in range(jobs):
        job_id = f"job-{n:02d}"
        terminal: JobEvent = (
            transition(job_id, site="site-1")
            if n % 2
            else lifecycle(job_id, S.FINISHED_COMPLETED, ["site-1", "site-2"])
        )
        events += _job_events(job_id, terminal)
    return events


@pytest.mark.integration
@pytest.mark.parametrize("round_", range(3))
def test_postgres_consumers_converge(pg_store_url: str, round_: int) -> None:
    events = _workload(jobs=8)
    orders = [events, events[::-1], random.Random(round_).sample(events, len(events))]
    stores = [PostgresStore(pg_store_url) for _ in orders]
    start, errors = threading.Barrier(len(orders)), []

    def consume(store: PostgresStore, order: list[JobEvent]) -> None:
        try:
            start.wait()
            for i in range(0, len(order), 5):  # batches spanning several jobs
                store.apply_batch(order[i : i + 5])
        except Exception as exc:  # reported below, with the thread's own traceback
            errors.append(exc)

    pairs = zip(stores, orders, strict=True)
    threads = [threading.Thread(target=consume, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    try:
        assert errors == []
        _assert_serial_histories(stores[0], events, copies=len(orders))
    finally:
        for store in stores:
            store.close()


def _assert_serial_histories(store: Store, events: list[JobEvent], copies: int) -> None:
    """One row per event, every copy counted, and each job's history is what one store gives
    when it applies the job's events in the recorded order (serialisable per job)."""
    by_id = {str(e.event_id): e for e in events}
    expected_once = MemoryStore()
    expected_once.apply_batch(events)
    for job_id in sorted({e.job_id for e in events}):
        view = store.get(job_id)
        assert view is not None
        assert sorted(r.event_id for r in view.history) == sorted(
            str(e.event_id) for e in events if e.job_id == job_id
        )
        assert {r.duplicates for r in view.history} == {copies - 1}
        serial = MemoryStore()
        replayed = serial.apply_batch([by_id[r.event_id] for r in view.history])
        assert [(r.row.outcome, r.row.status_after) for r in replayed] == [
            (r.outcome, r.status_after) for r in view.history
        ]
        serial_view = serial.get(job_id)
        once_view = expected_once.get(job_id)
        assert serial_view is not None and once_view is not None
        assert (view.status, view.sites) == (serial_view.status, serial_view.sites)
        assert view.status == once_view.status


@pytest.mark.integration
def test_postgres_migrations_do_not_race(pg_store_url: str) -> None:
    start, stores, errors = threading.Barrier(4), [], []

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresStore(pg_store_url))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == [] and len(stores) == 4
    with psycopg.connect(pg_store_url) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version")
        assert versions.fetchall() == [(1,), (2,)]
    for store in stores:
        store.close()


@pytest.mark.integration
def test_postgres_reconnects_after_a_lost_connection(pg_url: str, pg_store_url: str) -> None:
    name = f"exitpipe-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{pg_store_url}&application_name={name}")
    try:
        store.apply_batch([lifecycle()])
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            )

        with pytest.raises(StoreUnavailable) as caught:
            store.apply_batch([transition()])
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)

        assert store.apply_batch([transition()])[0].row.outcome == Outcome.APPLIED
        view = store.get("job-a")
        assert view is not None and len(view.history) == 2
    finally:
        store.close()


def _s(seconds: int) -> timedelta:
    return timedelta(seconds=seconds)


@pytest.mark.integration
def test_postgres_redoes_a_batch_when_an_id_is_filed_under_another_job_meanwhile(
    pg_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import consumers.store.postgres as pg

    first, other = PostgresStore(pg_store_url), PostgresStore(pg_store_url)
    try:
        fail_a = transition(job_id="job-a")
        fail_b = transition(job_id="job-b", event_id=fail_a.event_id)
        real, raced = pg.apply, []

        def racing(*args: Any) -> Any:
            # Between the first store's inbox read and its insert, another consumer files the
            # same event id under another job and commits.
            if not raced:
                raced.append(True)
                other.apply_batch([fail_b])
            return real(*args)

        monkeypatch.setattr(pg, "apply", racing)
        [result] = first.apply_batch([fail_a])

        assert raced and result.duplicate and result.row.job_id == "job-b"
        assert first.get("job-a") is None
        view = first.get("job-b")
        assert view is not None and [r.duplicates for r in view.history] == [1]
    finally:
        first.close()
        other.close()


# ---- 100,000 jobs: every page is read through an index --------------------------------------

PAGE_JOBS = 100_000
_PAGE_STATUSES = (S.FINISHED_COMPLETED, S.RUNNING, S.FINISHED_EXECUTION_EXCEPTION, S.SUBMITTED)


def _many_jobs(store: Store) -> None:
    """PAGE_JOBS jobs in four statuses; one failed job in a hundred disagrees with the server."""
    events: list[JobEvent] = []
    for n in range(PAGE_JOBS):
        job_id, status = f"job-{n:06d}", _PAGE_STATUSES[n % 4]
        if status is S.FINISHED_EXECUTION_EXCEPTION:
            events.append(transition(job_id))
            if n % 100 == 2:
                events.append(lifecycle(job_id, S.FINISHED_ABNORMAL))
        else:
            events.append(lifecycle(job_id, status))
    for start in range(0, len(events), 5000):
        store.apply_batch(events[start : start + 5000])


def _page_queries(store: Store) -> list[PageQuery]:
    """The dashboard's queries: each filter, each order, first pages and pages far in.

    (A prefix page reads the ids under its prefix from the cursor on until the page is full:
    with a filter that few of them pass, that is at most every id under the prefix.)
    """
    middle = store.page(PageQuery(after=Cursor(T0 + _s(10), "job-050000"), size=1))[0]
    deep = _after(middle)
    failed = S.FINISHED_EXECUTION_EXCEPTION
    return [
        PageQuery(),
        PageQuery(after=deep),
        PageQuery(status=S.RUNNING),
        PageQuery(status=S.RUNNING, after=deep),
        PageQuery(disagreements=True),
        PageQuery(disagreements=True, after=deep),
        PageQuery(status=failed, disagreements=True),
        PageQuery(prefix="job-01"),
        PageQuery(prefix="job-0", after=Cursor(T0, "job-050000")),
        PageQuery(prefix="job-01", status=S.RUNNING),
        PageQuery(prefix="job-01", status=failed),
    ]


@pytest.mark.integration
def test_sqlite_pages_of_100k_jobs_are_read_through_indexes(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "jobs.db"), clock=ticking_clock())
    try:
        _many_jobs(store)
        queries = _page_queries(store)
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as db:
        steps = [0]

        def count_steps() -> int:
            steps[0] += 1
            return 0

        db.set_progress_handler(count_steps, 100)  # called every 100 VM instructions
        db.execute("SELECT count(*) FROM jobs WHERE status IS NOT NULL").fetchall()
        full_scan, steps[0] = steps[0], 0
        for query in queries:
            statement = sqlite_page_statement(query)
            assert statement is not None
            plan = [
                row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement[0]}", statement[1])
            ]
            assert all("USING INDEX" in step or "USING COVERING INDEX" in step for step in plan), (
                query,
                plan,
            )
            assert not any("TEMP B-TREE" in step for step in plan), (query, plan)
            rows = db.execute(*statement).fetchall()
            assert len(rows) == query.size, query
            # A page's work does not grow with the store: a small part of one full scan.
            assert steps[0] < full_scan / 10, (query, steps[0], full_scan)
            steps[0] = 0


@pytest.mark.integration
def test_postgres_pages_of_100k_jobs_are_read_through_indexes(pg_store_url: str) -> None:
    store = PostgresStore(pg_store_url, clock=ticking_clock())
    try:
        _many_jobs(store)
        queries = _page_queries(store)
    finally:
        store.close()
    with psycopg.connect(pg_store_url, autocommit=True) as conn:
        conn.execute("ANALYZE jobs")  # what autovacuum does after a load like this one
        for query in queries:
            statement = pg_page_statement(query)
            assert statement is not None
            sql = f"EXPLAIN (ANALYZE, FORMAT JSON) {statement[0]}"
            (plan,) = conn.execute(sql.encode(), statement[1]).fetchone()
            nodes = list(_plan_nodes(plan[0]["Plan"]))
            kinds = {node["Node Type"] for node in nodes}
            assert "Seq Scan" not in kinds and "Sort" not in kinds, (query, kinds)
            scans = [n for n in nodes if n.get("Relation Name") == "jobs"]
            assert scans and all(n["Node Type"].startswith("Index") for n in scans), query
            assert plan[0]["Plan"]["Actual Rows"] == query.size, query


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)
