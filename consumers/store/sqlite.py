"""The job store on SQLite (stdlib ``sqlite3``), for a single host.

WAL mode lets readers (``exitpipe jobs``) run while the daemon writes. Every batch is one
``BEGIN IMMEDIATE`` transaction: taking the write lock up front means a second writer waits
(``busy_timeout``) at BEGIN instead of failing half-way with a lock it cannot upgrade. The
history table's UNIQUE ``event_id`` is the inbox, written in the same transaction as the job.
``updated_at`` is the ``recorded_at`` of the job's latest distinct event.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from consumers.state import HistoryRow, Job, JobEvent, apply
from consumers.store import (
    Applied,
    JobSummary,
    JobView,
    PageQuery,
    StoreError,
    StoreUnavailable,
    is_verdict,
)
from consumers.store._shared import (
    HISTORY_COLUMNS,
    Clock,
    PageSql,
    check_limit,
    job_from,
    normalised,
    page_query,
    row_from,
    row_values,
    status_or_none,
    utc,
    utc_now,
)
from schemas.codes import JobStatus

# One entry per schema version, oldest first: version N is MIGRATIONS[N - 1]. Never edit a
# released entry; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            status TEXT,
            sites TEXT,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE history (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            site TEXT,
            code TEXT,
            return_code INTEGER,
            action TEXT NOT NULL,
            outcome TEXT NOT NULL,
            status_before TEXT,
            status_after TEXT,
            occurred_at TEXT NOT NULL,
            recorded_at TEXT NOT NULL,
            policy TEXT,
            duplicates INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX history_job_seq ON history (job_id, seq)",
        "CREATE INDEX jobs_status_updated ON jobs (status, updated_at)",
    ),
    (
        # 2: the server's verdict kept with the job (set on apply), and an index behind
        # every page of the dashboard: by update, by status, the disagreeing jobs.
        "ALTER TABLE jobs ADD COLUMN server_status TEXT",
        """UPDATE jobs SET server_status = (
            SELECT h.action FROM history h WHERE h.job_id = jobs.job_id
            AND h.kind = 'lifecycle' AND substr(h.action, 1, 9) = 'FINISHED:'
            ORDER BY h.seq LIMIT 1
        )""",
        "DROP INDEX jobs_status_updated",
        "CREATE INDEX jobs_status_page ON jobs (status, updated_at, job_id)",
        "CREATE INDEX jobs_updated ON jobs (updated_at, job_id)",
        "CREATE INDEX jobs_disagree ON jobs (updated_at, job_id) "
        "WHERE server_status IS NOT NULL AND server_status <> status",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_UNAVAILABLE = ("locked", "busy", "unable to open")
_INSERT_ROW = (
    f"INSERT INTO history ({', '.join(HISTORY_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in HISTORY_COLUMNS)})"
)
_UPSERT_JOB = (
    "INSERT INTO jobs (job_id, status, sites, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (job_id) DO UPDATE SET status = excluded.status, sites = excluded.sites, "
    "updated_at = excluded.updated_at"
)
_SELECT_ROW = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM history"
# The first verdict recorded wins: later ones find the column set.
_SET_VERDICT = "UPDATE jobs SET server_status = ? WHERE job_id = ? AND server_status IS NULL"
_SUMMARY = "SELECT job_id, status, updated_at, server_status FROM jobs"
_PAGE = PageSql(
    mark=lambda name: f":{name}", time=lambda t: _text_time(t), unindexed=lambda c: f"+{c}"
)


def _text_time(value: datetime) -> str:
    # Fixed width (always microseconds, always +00:00) so text order is time order.
    return utc(value).isoformat(timespec="microseconds")


def _parse_time(value: str) -> datetime:
    return utc(datetime.fromisoformat(value))


def _json_or_null(value: Any) -> str | None:
    return json.dumps(value, separators=(",", ":")) if value is not None else None


def _encode(row: HistoryRow) -> dict[str, Any]:
    values = row_values(row)
    values["occurred_at"] = _text_time(row.occurred_at)
    values["recorded_at"] = _text_time(row.recorded_at)
    values["policy"] = _json_or_null(values["policy"])
    return values


def _decode(record: sqlite3.Row) -> HistoryRow:
    values = dict(record)
    values["occurred_at"] = _parse_time(record["occurred_at"])
    values["recorded_at"] = _parse_time(record["recorded_at"])
    values["policy"] = json.loads(record["policy"]) if record["policy"] is not None else None
    return row_from(values)


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    # SQLite limits the host parameters of one statement (999 in older builds).
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _translate(exc: sqlite3.Error, path: str) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError) and any(s in str(exc) for s in _UNAVAILABLE):
        return StoreUnavailable(f"SQLite store {path}: {exc}")
    return StoreError(f"SQLite store {path}: {exc}")


class SqliteStore:
    """A ``Store`` in one SQLite file; ``busy_timeout`` is how long a write waits for a lock."""

    def __init__(self, path: str, clock: Clock = utc_now, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            with self._errors():
                self._conn = sqlite3.connect(
                    path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
                )
                self._configure(self._conn, busy_timeout)
            self._migrate()
        except StoreError:
            self.close()
            raise

    @staticmethod
    def _configure(conn: sqlite3.Connection, busy_timeout: float) -> None:
        # isolation_level=None (at connect): sqlite3 issues no BEGIN of its own; we do.
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an event is acked after COMMIT, so COMMIT must survive a power cut.
        conn.execute("PRAGMA synchronous = FULL")

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"SQLite store {self._path} is closed")
        return self._conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _translate(exc, self._path) from exc

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            db = self._db
            db.execute(begin)
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = db.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            version: int = current.fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"SQLite store {self._path} has schema version {version}, newer than "
                    f"{SCHEMA_VERSION} which this exitpipe knows: upgrade exitpipe"
                )
            for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
                for step in steps:
                    db.execute(step)
                db.execute(
                    "INSERT INTO schema_version VALUES (?, ?)", (number, _text_time(utc_now()))
                )

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._transaction("BEGIN") as db:
            result: int = db.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            return result

    def apply_batch(self, events: Sequence[JobEvent]) -> builtins.list[Applied]:
        """Apply events in order in one transaction; one result per event, in order."""
        # Set-based: one read of the batch's inbox rows and jobs, the pure state machine in
        # memory, then one executemany per table. Same effect as one event at a time (the
        # contract suite checks it), a fraction of the statements.
        with self._transaction() as db:
            now = utc(self._clock())
            ids = [str(event.event_id) for event in events]
            seen = self._rows_by_id(db, ids)
            jobs = self._jobs_by_id(db, [event.job_id for event in events])
            results: builtins.list[Applied] = []
            new_rows: builtins.list[HistoryRow] = []
            repeats: Counter[str] = Counter()
            touched: dict[str, Job] = {}
            for event, event_id in zip(events, ids, strict=True):
                if event_id in seen:
                    row = replace(seen[event_id], duplicates=seen[event_id].duplicates + 1)
                    seen[event_id] = row
                    repeats[event_id] += 1
                    results.append(Applied(row=row, duplicate=True))
                    continue
                job = jobs.get(event.job_id) or Job(job_id=event.job_id)
                after, row = apply(job, event, now)
                jobs[event.job_id] = touched[event.job_id] = after
                seen[event_id] = row = normalised(row)
                new_rows.append(row)
                results.append(Applied(row=row, duplicate=False))
            if new_rows:
                db.executemany(_INSERT_ROW, [_encode(row) for row in new_rows])
            if repeats:
                db.executemany(
                    "UPDATE history SET duplicates = duplicates + ? WHERE event_id = ?",
                    [(n, event_id) for event_id, n in repeats.items()],
                )
            if touched:
                db.executemany(_UPSERT_JOB, [self._job_params(j, now) for j in touched.values()])
            verdicts = [(row.action, row.job_id) for row in new_rows if is_verdict(row)]
            if verdicts:
                db.executemany(_SET_VERDICT, verdicts)
            return results

    @staticmethod
    def _rows_by_id(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, HistoryRow]:
        found: dict[str, HistoryRow] = {}
        for chunk in _chunks(sorted(set(ids))):
            marks = ", ".join("?" * len(chunk))
            for record in db.execute(f"{_SELECT_ROW} WHERE event_id IN ({marks})", chunk):
                found[record["event_id"]] = _decode(record)
        return found

    @staticmethod
    def _jobs_by_id(db: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, Job]:
        found: dict[str, Job] = {}
        for chunk in _chunks(sorted(set(job_ids))):
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT job_id, status, sites FROM jobs WHERE job_id IN ({marks})"
            for record in db.execute(sql, chunk):
                sites = json.loads(record["sites"]) if record["sites"] is not None else None
                found[record["job_id"]] = job_from(record["job_id"], record["status"], sites)
        return found

    @staticmethod
    def _job_params(job: Job, now: datetime) -> tuple[Any, ...]:
        status = job.status.value if job.status else None
        sites = _json_or_null(list(job.sites) if job.sites is not None else None)
        return (job.job_id, status, sites, _text_time(now))

    def get(self, job_id: str) -> JobView | None:
        """A job and its history, oldest row first; None for a job never seen."""
        with self._transaction("BEGIN") as db:
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None:
                return None
            rows = db.execute(f"{_SELECT_ROW} WHERE job_id = ? ORDER BY seq", (job_id,))
            history = tuple(_decode(r) for r in rows.fetchall())
        sites = json.loads(job["sites"]) if job["sites"] is not None else None
        known = job_from(job_id, job["status"], sites)
        return JobView(job_id, known.status, known.sites, _parse_time(job["updated_at"]), history)

    def close(self) -> None:
        """Close the connection; later calls raise StoreError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def list(
        self,
        status: JobStatus | None = None,
        limit: int | None = None,
        disagreements: bool = False,
    ) -> builtins.list[JobSummary]:
        """Jobs (only those in ``status``, or that disagree, when asked), oldest update first."""
        check_limit(limit)
        with self._transaction("BEGIN") as db:
            records = db.execute(
                f"{_SUMMARY} WHERE (?1 IS NULL OR status = ?1) "
                "AND (NOT ?3 OR (server_status IS NOT NULL AND server_status IS NOT status)) "
                "ORDER BY updated_at, job_id LIMIT ?2",
                (status.value if status else None, -1 if limit is None else limit, disagreements),
            ).fetchall()
        return [_summary(r) for r in records]

    def page(self, query: PageQuery) -> builtins.list[JobSummary]:
        """One page of jobs, read in the order of an index (``PageQuery``)."""
        found = page_statement(query)
        if found is None:
            return []
        sql, values = found
        with self._transaction("BEGIN") as db:
            records = db.execute(sql, values).fetchall()
        return [_summary(r) for r in records]


def page_statement(query: PageQuery) -> tuple[str, dict[str, Any]] | None:
    """The SQL of one page and its parameters (None when no job can match): for EXPLAIN."""
    found = page_query(query, _PAGE)
    return (f"{_SUMMARY} {found[0]}", found[1]) if found else None


def _summary(record: sqlite3.Row) -> JobSummary:
    return JobSummary(
        record["job_id"],
        status_or_none(record["status"]),
        _parse_time(record["updated_at"]),
        status_or_none(record["server_status"]),
    )
