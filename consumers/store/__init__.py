"""The job store port: one small interface, three implementations (memory, SQLite, PostgreSQL).

Every implementation applies events through ``consumers.state.apply`` inside one transaction
together with the event's inbox row (the history row keyed by event id), so a redelivered
event only counts up that row's ``duplicates``.

Errors::

    StoreError              a bug or bad configuration: never retried
    └── StoreUnavailable    the database is away or locked: retry with backoff
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from consumers.state import HistoryRow, JobEvent
from schemas.codes import JobStatus


class StoreError(Exception):
    """The store cannot do what was asked (bad URL, bad schema version, a bug)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or is locked right now; the same call may succeed later."""


@dataclass(frozen=True)
class JobView:
    """A job with its whole history, oldest row first."""

    job_id: str
    status: JobStatus | None
    sites: tuple[str, ...] | None
    updated_at: datetime
    history: tuple[HistoryRow, ...]

    @property
    def server_status(self) -> JobStatus | None:
        """The server's own verdict: the first lifecycle FINISHED:* recorded, applied or not."""
        return server_status(self.history)

    def as_json(self) -> dict[str, object]:
        """The object ``jobs show --json`` prints (DESIGN 6), without ``exits``."""
        server = self.server_status
        return {
            "job_id": self.job_id,
            "status": self.status.value if self.status else None,
            "sites": list(self.sites) if self.sites is not None else None,
            "server_status": server.value if server else None,
            "history": [row.as_json() for row in self.history],
        }


def server_status(history: Sequence[HistoryRow]) -> JobStatus | None:
    """The status of the first lifecycle FINISHED:* row of a job's history."""
    for row in history:
        if is_verdict(row):
            return JobStatus(row.action)
    return None


def is_verdict(row: HistoryRow) -> bool:
    """True for a lifecycle FINISHED:* row: the server's own verdict on its job."""
    return row.kind == "lifecycle" and row.action.startswith(FINISHED)


FINISHED = "FINISHED:"


@dataclass(frozen=True)
class JobSummary:
    """One line of ``jobs list``."""

    job_id: str
    status: JobStatus | None
    updated_at: datetime
    server_status: JobStatus | None = None

    @property
    def disagrees(self) -> bool:
        """True when the server's own verdict is known and differs from the store's status."""
        return self.server_status is not None and self.server_status != self.status

    def as_json(self) -> dict[str, object]:
        """One entry of ``jobs list --json`` (DESIGN 6)."""
        return {
            "job_id": self.job_id,
            "status": self.status.value if self.status else None,
            "server_status": self.server_status.value if self.server_status else None,
            "updated_at": self.updated_at.isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True)
class Cursor:
    """Where a page of jobs ends: the last job it showed (keyset pagination)."""

    updated_at: datetime
    job_id: str


@dataclass(frozen=True)
class PageQuery:
    """One page of ``Store.page``: filters, where the previous page ended, and a size.

    Without ``prefix`` a page lists the most recently updated jobs first; with it, the jobs
    whose id starts with ``prefix``, in job id order (code point order in every store). Both
    orders are index orders, so a page costs the same on the first page and the thousandth.
    """

    status: JobStatus | None = None
    disagreements: bool = False
    prefix: str = ""
    after: Cursor | None = None
    size: int = 50


def prefix_bounds(prefix: str) -> tuple[str, str] | None:
    """The id range ``[low, high)`` of the ids starting with ``prefix``; None if none can.

    Job ids are ASCII (DESIGN 3), so bumping the last character of the prefix gives the
    first id past every match, and the range is an index range in every store.
    """
    if not JOB_ID_CHARS.fullmatch(prefix):
        return None
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


JOB_ID_CHARS = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(frozen=True)
class Applied:
    """What the store did with one event: its history row, and whether it was a duplicate."""

    row: HistoryRow
    duplicate: bool


class Store(Protocol):
    """What the job-state consumer, the CLI and replay need from a store."""

    def apply_batch(self, events: Sequence[JobEvent]) -> list[Applied]:
        """Apply events in order in one transaction; one result per event, in order."""
        ...

    def get(self, job_id: str) -> JobView | None:
        """A job and its history, or None when the store has never seen it."""
        ...

    def list(
        self,
        status: JobStatus | None = None,
        limit: int | None = None,
        disagreements: bool = False,
    ) -> list[JobSummary]:
        """Jobs, optionally only those in ``status`` or whose server verdict differs, oldest
        update first."""
        ...

    def page(self, query: PageQuery) -> builtins.list[JobSummary]:
        """At most ``query.size`` jobs after ``query.after``, each page read through an index."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
