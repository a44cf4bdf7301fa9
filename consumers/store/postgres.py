"""The job store on PostgreSQL (psycopg 3), for several job-state consumers on one database.

Each batch is one transaction. It first makes sure every job of the batch has a row and locks
those rows (``FOR UPDATE``) in sorted job_id order, so consumers serialise per job, and two
batches that touch the same jobs in different orders queue instead of deadlocking. Only then
is the inbox consulted: the history row goes in with ``ON CONFLICT (event_id) DO NOTHING``,
and a conflict means a duplicate (count it, leave the job alone), as in eventsourcing's
tracking table. A placeholder job row left by a batch whose only event for it was a duplicate
filed under another job is deleted before commit. ``updated_at`` is the ``recorded_at`` of
the job's latest distinct event.

``psycopg.OperationalError`` (refused, lost, shut down, deadlock) becomes StoreUnavailable
and the connection is dropped, to be reopened lazily by the next call.
"""

from __future__ import annotations

import builtins
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

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
    redact_url,
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
            sites JSONB,
            updated_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE history (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id UUID NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES jobs (job_id),
            kind TEXT NOT NULL,
            site TEXT,
            code TEXT,
            return_code INTEGER,
            action TEXT NOT NULL,
            outcome TEXT NOT NULL,
            status_before TEXT,
            status_after TEXT,
            occurred_at TIMESTAMPTZ NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL,
            policy JSONB,
            duplicates BIGINT NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX history_job_seq ON history (job_id, seq)",
        "CREATE INDEX jobs_status_updated ON jobs (status, updated_at)",
    ),
    (
        # 2: the server's verdict kept with the job (set on apply), and an index behind
        # every page of the dashboard. Job ids are ordered in the "C" collation, as SQLite
        # and the memory store order them, whatever the database's default collation.
        "ALTER TABLE jobs ADD COLUMN server_status TEXT",
        """UPDATE jobs SET server_status = (
            SELECT h.action FROM history h WHERE h.job_id = jobs.job_id
            AND h.kind = 'lifecycle' AND substr(h.action, 1, 9) = 'FINISHED:'
            ORDER BY h.seq LIMIT 1
        )""",
        "DROP INDEX jobs_status_updated",
        'CREATE INDEX jobs_status_page ON jobs (status, updated_at, job_id COLLATE "C")',
        'CREATE INDEX jobs_updated ON jobs (updated_at, job_id COLLATE "C")',
        'CREATE INDEX jobs_disagree ON jobs (updated_at, job_id COLLATE "C") '
        "WHERE server_status IS NOT NULL AND server_status <> status",
        'CREATE INDEX jobs_id_c ON jobs (job_id COLLATE "C")',
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_COLUMNS = ", ".join(HISTORY_COLUMNS)
_INSERT_ROW = (
    f"INSERT INTO history ({_COLUMNS}) VALUES ({', '.join(f'%({c})s' for c in HISTORY_COLUMNS)}) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING seq"
)
_COUNT_DUPLICATE = (
    f"UPDATE history SET duplicates = duplicates + 1 WHERE event_id = %s RETURNING {_COLUMNS}"
)
_UPDATE_JOB = "UPDATE jobs SET status = %s, sites = %s, updated_at = %s WHERE job_id = %s"
_ENSURE_JOB = "INSERT INTO jobs (job_id, updated_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"
_LOCK_JOB = "SELECT status, sites FROM jobs WHERE job_id = %s FOR UPDATE"
# Rows are inserted and locked in job_id order, the same global order as _LOCK_JOB's loop.
_ENSURE_JOBS = (
    "INSERT INTO jobs (job_id, updated_at) SELECT j, %s FROM unnest(%s::text[]) AS j "
    "ORDER BY j ON CONFLICT DO NOTHING"
)
_LOCK_JOBS = (
    "SELECT job_id, status, sites FROM jobs WHERE job_id = ANY(%s) ORDER BY job_id FOR UPDATE"
)
_SEEN_ROWS = f"SELECT {_COLUMNS} FROM history WHERE event_id = ANY(%s::uuid[])"
_INSERT_NEW = _INSERT_ROW.removesuffix(" RETURNING seq")
_ADD_DUPLICATES = "UPDATE history SET duplicates = duplicates + %s WHERE event_id = %s"
# The first verdict recorded wins: later ones find the column set.
_SET_VERDICT = "UPDATE jobs SET server_status = %s WHERE job_id = %s AND server_status IS NULL"
_SUMMARY = "SELECT job_id, status, updated_at, server_status FROM jobs"
_ID = 'job_id COLLATE "C"'
_PAGE = PageSql(
    mark=lambda name: f"%({name})s", time=utc, job_id=_ID, where=("status IS NOT NULL",)
)
# Per schema, so stores in different schemas of one database do not wait for each other.
_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('exitpipe.schema:' || current_schema()))"

Connection = psycopg.Connection[DictRow]


class _InboxRace(Exception):
    """An event id of the batch was filed under another job while the batch was planned."""


def _job_params(job: Job, now: datetime) -> tuple[Any, ...]:
    sites = Jsonb(list(job.sites)) if job.sites is not None else None
    return (job.status.value if job.status else None, sites, now, job.job_id)


def _params(values: dict[str, Any]) -> dict[str, Any]:
    return {**values, "policy": Jsonb(values["policy"]) if values["policy"] else None}


class PostgresStore:
    """A ``Store`` on PostgreSQL; ``url`` is a libpq URL (``postgresql://`` or ``postgres://``)."""

    def __init__(self, url: str, clock: Clock = utc_now, connect_timeout: int = 10) -> None:
        self._url = url
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: Connection | None = None
        self._closed = False
        try:
            with self._session() as conn:
                self._migrate(conn)
        except StoreError:
            self.close()
            raise

    def _connect(self) -> Connection:
        return psycopg.connect(
            self._url,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=self._connect_timeout,
        )

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @contextmanager
    def _session(self) -> Iterator[Connection]:
        """The connection (opened if need be), with psycopg errors turned into ours."""
        with self._lock:
            if self._closed:
                raise StoreError("PostgreSQL store is closed")
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                yield self._conn
            except psycopg.OperationalError as exc:
                self._drop()
                where = redact_url(self._url)
                raise StoreUnavailable(f"PostgreSQL store {where}: {exc}") from exc
            except psycopg.Error as exc:
                raise StoreError(f"PostgreSQL store {redact_url(self._url)}: {exc}") from exc

    def _migrate(self, conn: Connection) -> None:
        # Two daemons starting at once: the advisory lock makes the second wait, then it finds
        # the tables made and the version recorded. DDL is transactional in PostgreSQL.
        with conn.transaction():
            conn.execute(_MIGRATION_LOCK)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = self._version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"PostgreSQL store has schema version {version}, newer than "
                    f"{SCHEMA_VERSION} which this exitpipe knows: upgrade exitpipe"
                )
            for number, steps in enumerate(MIGRATIONS[version:], start=version + 1):
                for step in steps:
                    conn.execute(step)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))

    @staticmethod
    def _version(conn: Connection) -> int:
        found = conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version")
        record = found.fetchone()
        return int(record["v"]) if record else 0

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._session() as conn:
            return self._version(conn)

    def apply_batch(self, events: Sequence[JobEvent]) -> builtins.list[Applied]:
        """Apply events in order in one transaction; one result per event, in order."""
        if not events:
            return []
        try:
            with self._session() as conn, conn.transaction():
                return self._apply_set(conn, events)
        except _InboxRace:
            # An event id filed meanwhile under another job (ids are global): redo the batch
            # one statement at a time, where each conflict is seen as it happens.
            with self._session() as conn, conn.transaction():
                return self._apply_each(conn, events)

    def _apply_set(self, conn: Connection, events: Sequence[JobEvent]) -> builtins.list[Applied]:
        # Set-based: lock the batch's jobs in sorted order with one statement, read their
        # inbox rows with one, run the pure state machine in memory, write with executemany
        # (pipelined by psycopg). The job locks make the inbox read stable: the same event
        # id comes for the same job, and its other consumers wait on the lock.
        now = utc(self._clock())
        job_ids = sorted({event.job_id for event in events})
        conn.execute(_ENSURE_JOBS, (now, job_ids))
        jobs = {
            r["job_id"]: job_from(r["job_id"], r["status"], r["sites"])
            for r in conn.execute(_LOCK_JOBS, (job_ids,))
        }
        ids = [str(event.event_id) for event in events]
        seen = {
            str(r["event_id"]): row_from(r) for r in conn.execute(_SEEN_ROWS, (sorted(set(ids)),))
        }
        results: builtins.list[Applied] = []
        new_rows: builtins.list[HistoryRow] = []
        repeats: Counter[str] = Counter()
        touched: dict[str, Job] = {}
        for event, event_id in zip(events, ids, strict=True):
            if event_id in seen:
                seen[event_id] = row = replace(
                    seen[event_id], duplicates=seen[event_id].duplicates + 1
                )
                repeats[event_id] += 1
                results.append(Applied(row=row, duplicate=True))
                continue
            after, row = apply(jobs[event.job_id], event, now)
            jobs[event.job_id] = touched[event.job_id] = after
            seen[event_id] = row = normalised(row)
            new_rows.append(row)
            results.append(Applied(row=row, duplicate=False))
        with conn.cursor() as cur:
            if new_rows:
                cur.executemany(_INSERT_NEW, [_params(row_values(r)) for r in new_rows])
                if cur.rowcount != len(new_rows):
                    raise _InboxRace
            if repeats:
                cur.executemany(_ADD_DUPLICATES, [(n, i) for i, n in repeats.items()])
            if touched:
                cur.executemany(_UPDATE_JOB, [_job_params(j, now) for j in touched.values()])
            verdicts = [(row.action, row.job_id) for row in new_rows if is_verdict(row)]
            if verdicts:
                cur.executemany(_SET_VERDICT, verdicts)
        conn.execute("DELETE FROM jobs WHERE job_id = ANY(%s) AND status IS NULL", (job_ids,))
        return results

    def _apply_each(self, conn: Connection, events: Sequence[JobEvent]) -> builtins.list[Applied]:
        now = utc(self._clock())
        job_ids = sorted({event.job_id for event in events})
        jobs = self._lock_jobs(conn, job_ids, now)
        results = [self._apply_one(conn, jobs, event, now) for event in events]
        conn.execute("DELETE FROM jobs WHERE job_id = ANY(%s) AND status IS NULL", (job_ids,))
        return results

    @staticmethod
    def _lock_jobs(conn: Connection, job_ids: builtins.list[str], now: datetime) -> dict[str, Job]:
        # One job at a time in sorted order: every lock of the batch (an uncommitted insert
        # is one too) is taken in the same global order, so batches cannot deadlock.
        jobs = {}
        for job_id in job_ids:
            conn.execute(_ENSURE_JOB, (job_id, now))
            record = conn.execute(_LOCK_JOB, (job_id,)).fetchone()
            if record is None:  # cannot happen: the row exists and deletes take this lock
                raise StoreError(f"job {job_id}: row vanished while locking it")
            jobs[job_id] = job_from(job_id, record["status"], record["sites"])
        return jobs

    def _apply_one(
        self, conn: Connection, jobs: dict[str, Job], event: JobEvent, now: datetime
    ) -> Applied:
        after, row = apply(jobs[event.job_id], event, now)
        inserted = conn.execute(_INSERT_ROW, _params(row_values(row))).fetchone()
        if inserted is None:
            return Applied(row=self._count_duplicate(conn, row.event_id), duplicate=True)
        jobs[event.job_id] = after
        sites = Jsonb(list(after.sites)) if after.sites is not None else None
        status = after.status.value if after.status else None
        conn.execute(_UPDATE_JOB, (status, sites, now, after.job_id))
        if is_verdict(row):
            conn.execute(_SET_VERDICT, (row.action, row.job_id))
        return Applied(row=normalised(row), duplicate=False)

    @staticmethod
    def _count_duplicate(conn: Connection, event_id: str) -> HistoryRow:
        counted = conn.execute(_COUNT_DUPLICATE, (event_id,)).fetchone()
        if counted is None:  # the conflicting row cannot vanish inside our transaction
            raise StoreError(f"event {event_id}: inbox conflict but no history row")
        return row_from(counted)

    def get(self, job_id: str) -> JobView | None:
        """A job and its history, oldest row first; None for a job never seen."""
        with self._session() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            job = conn.execute(
                "SELECT status, sites, updated_at FROM jobs "
                "WHERE job_id = %s AND status IS NOT NULL",
                (job_id,),
            ).fetchone()
            if job is None:
                return None
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM history WHERE job_id = %s ORDER BY seq", (job_id,)
            ).fetchall()
        known = job_from(job_id, job["status"], job["sites"])
        history = tuple(row_from(r) for r in rows)
        return JobView(job_id, known.status, known.sites, utc(job["updated_at"]), history)

    def close(self) -> None:
        """Close the connection; later calls raise StoreError."""
        with self._lock:
            self._closed = True
            self._drop()

    def list(
        self,
        status: JobStatus | None = None,
        limit: int | None = None,
        disagreements: bool = False,
    ) -> builtins.list[JobSummary]:
        """Jobs (only those in ``status``, or that disagree, when asked), oldest update first."""
        check_limit(limit)
        with self._session() as conn:
            records = conn.execute(
                f"{_SUMMARY} WHERE status IS NOT NULL "
                "AND (%(s)s::text IS NULL OR status = %(s)s) "
                "AND (NOT %(d)s OR server_status IS DISTINCT FROM status "
                "AND server_status IS NOT NULL) "
                f"ORDER BY updated_at, {_ID} LIMIT %(n)s",
                {"s": status.value if status else None, "n": limit, "d": disagreements},
            ).fetchall()
        return [_summary(r) for r in records]

    def page(self, query: PageQuery) -> builtins.list[JobSummary]:
        """One page of jobs, read in the order of an index (``PageQuery``)."""
        found = page_statement(query)
        if found is None:
            return []
        sql, values = found
        with self._session() as conn:
            records = conn.execute(sql, values).fetchall()
        return [_summary(r) for r in records]


def page_statement(query: PageQuery) -> tuple[str, dict[str, Any]] | None:
    """The SQL of one page and its parameters (None when no job can match): for EXPLAIN."""
    found = page_query(query, _PAGE)
    return (f"{_SUMMARY} {found[0]}", found[1]) if found else None


def _summary(record: DictRow) -> JobSummary:
    return JobSummary(
        record["job_id"],
        status_or_none(record["status"]),
        utc(record["updated_at"]),
        status_or_none(record["server_status"]),
    )
