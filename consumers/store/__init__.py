"""The job store port: one small interface, three implementations (memory, SQLite, PostgreSQL).

Every implementation applies events through ``consumers.state.apply`` inside one transaction
together with the event's inbox row (the history row keyed by event id), so a redelivered
event only counts up that row's ``duplicates``.

Errors::

    StoreError              a bug or bad configuration: never retried
    └── StoreUnavailable    the database is away or locked: retry with backoff
"""

from __future__ import annotations

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

    def as_json(self) -> dict[str, object]:
        """The object ``jobs show --json`` prints (DESIGN 6)."""
        return {
            "job_id": self.job_id,
            "status": self.status.value if self.status else None,
            "sites": list(self.sites) if self.sites is not None else None,
            "history": [row.as_json() for row in self.history],
        }


@dataclass(frozen=True)
class JobSummary:
    """One line of ``jobs list``."""

    job_id: str
    status: JobStatus | None
    updated_at: datetime


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

    def list(self, status: JobStatus | None = None, limit: int | None = None) -> list[JobSummary]:
        """Jobs, optionally only those in ``status``, oldest update first."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
