"""The job store in memory: the port's exact semantics with dicts, for replay and unit tests.

A batch is staged in a ``_Batch`` overlay and merged only when every event of it has been
applied, so a batch commits whole, like the SQL stores' one transaction, at a cost that grows
with the batch and not with the store.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from consumers.state import HistoryRow, Job, JobEvent, apply
from consumers.store import Applied, JobSummary, JobView, PageQuery, prefix_bounds, server_status
from consumers.store._shared import Clock, check_limit, normalised, utc, utc_now
from schemas.codes import JobStatus


@dataclass(frozen=True)
class _JobRecord:
    job: Job
    updated_at: datetime


def _applied(
    event: JobEvent, seen: HistoryRow | None, job: Job | None, now: datetime
) -> tuple[Applied, Job | None]:
    """What ``event`` does: counted as a duplicate of ``seen``, or applied to ``job`` (None: a
    job not seen before); with the job after it, None for a duplicate."""
    if seen is not None:
        return Applied(row=replace(seen, duplicates=seen.duplicates + 1), duplicate=True), None
    after, row = apply(job or Job(job_id=event.job_id), event, now)
    return Applied(row=normalised(row), duplicate=False), after


class _Batch:
    """Writes of one batch, read through before the committed state."""

    __slots__ = ("jobs", "new", "rows")  # made once per batch: replay makes one per event

    def __init__(self) -> None:
        self.jobs: dict[str, _JobRecord] = {}
        self.rows: dict[UUID, HistoryRow] = {}
        self.new: builtins.list[tuple[UUID, HistoryRow]] = []


class MemoryStore:
    """A ``Store`` in dicts; ``clock`` gives each batch's ``recorded_at``."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobRecord] = {}
        # The inbox, keyed by the event's UUID (hashing it is cheaper than formatting it).
        self._rows: dict[UUID, HistoryRow] = {}
        self._order: dict[str, builtins.list[UUID]] = {}  # job id -> event ids, oldest first

    def apply_batch(self, events: Sequence[JobEvent]) -> builtins.list[Applied]:
        """Apply events in order; all of the batch is kept, or none of it."""
        with self._lock:
            batch = _Batch()
            now = utc(self._clock())
            results = [self._apply_one(batch, event, now) for event in events]
            self._commit(batch)
            return results

    def apply_one(self, event: JobEvent) -> Applied:
        """``apply_batch([event])[0]``, without a batch's overlay: a batch of one commits as it
        applies. Replay applies every event alone, and the overlay was a third of that."""
        with self._lock:
            now = utc(self._clock())
            event_id, job_id = event.event_id, event.job_id
            seen = self._rows.get(event_id)
            record = self._jobs.get(job_id) if seen is None else None
            applied, after = _applied(event, seen, record.job if record else None, now)
            self._rows[event_id] = applied.row
            if after is not None:
                self._jobs[job_id] = _JobRecord(after, now)
                order = self._order.get(job_id)
                if order is None:
                    self._order[job_id] = [event_id]
                else:
                    order.append(event_id)
            return applied

    def _apply_one(self, batch: _Batch, event: JobEvent, now: datetime) -> Applied:
        event_id = event.event_id
        seen = batch.rows.get(event_id) or self._rows.get(event_id)
        record = None if seen else batch.jobs.get(event.job_id) or self._jobs.get(event.job_id)
        applied, after = _applied(event, seen, record.job if record else None, now)
        batch.rows[event_id] = applied.row
        if after is not None:
            batch.jobs[event.job_id] = _JobRecord(after, now)
            batch.new.append((event_id, applied.row))
        return applied

    def _commit(self, batch: _Batch) -> None:
        self._jobs.update(batch.jobs)
        self._rows.update(batch.rows)
        for event_id, row in batch.new:
            self._order.setdefault(row.job_id, []).append(event_id)

    def get(self, job_id: str) -> JobView | None:
        """A job and its history, oldest row first; None for a job never seen."""
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            history = tuple(self._rows[e] for e in self._order.get(job_id, ()))
            job = record.job
            return JobView(job_id, job.status, job.sites, record.updated_at, history)

    def close(self) -> None:
        """Nothing to release."""

    def list(
        self,
        status: JobStatus | None = None,
        limit: int | None = None,
        disagreements: bool = False,
    ) -> builtins.list[JobSummary]:
        """Jobs (only those in ``status``, or that disagree, when asked), oldest update first."""
        check_limit(limit)
        with self._lock:
            records = [r for r in self._jobs.values() if status is None or r.job.status == status]
            summaries = [self._summary(r) for r in records]
        summaries.sort(key=lambda s: (s.updated_at, s.job_id))
        if disagreements:
            summaries = [s for s in summaries if s.disagrees]
        return summaries[:limit]

    def page(self, query: PageQuery) -> builtins.list[JobSummary]:
        """One page of jobs, in the order the SQL stores read from their indexes."""
        check_limit(query.size)
        jobs = self.list(status=query.status, disagreements=query.disagreements)
        after = query.after
        if query.prefix:
            bounds = prefix_bounds(query.prefix)
            low, high = bounds if bounds else ("", "")
            jobs = sorted((j for j in jobs if low <= j.job_id < high), key=lambda j: j.job_id)
            jobs = [j for j in jobs if after is None or j.job_id > after.job_id]
        else:
            jobs.reverse()  # newest update first
            if after is not None:
                key = (utc(after.updated_at), after.job_id)
                jobs = [j for j in jobs if (j.updated_at, j.job_id) < key]
        return jobs[: query.size]

    def _summary(self, record: _JobRecord) -> JobSummary:
        history = [self._rows[e] for e in self._order.get(record.job.job_id, ())]
        job = record.job
        return JobSummary(job.job_id, job.status, record.updated_at, server_status(history))
