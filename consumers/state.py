"""The job state machine of DESIGN section 5: a pure function, no I/O.

``apply(job, event, recorded_at)`` returns the job after the event and the history row that
records it. Duplicates are not seen here: the store keeps the inbox of event ids and calls
``apply`` only for an id it has not seen, in the same transaction as the effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from schemas.codes import JobStatus
from schemas.events import LifecycleEvent, PolicyRef, Transition

JobEvent = Transition | LifecycleEvent


class Outcome(StrEnum):
    """What an event did to its job; checked in this order (after duplicates)."""

    IGNORED_TERMINAL = "ignored_terminal"
    IGNORED_FOREIGN_SITE = "ignored_foreign_site"
    IGNORED_BACKWARD = "ignored_backward"
    APPLIED = "applied"


@dataclass(frozen=True)
class Job:
    """A job as the store knows it; ``status`` None means not seen before."""

    job_id: str
    status: JobStatus | None = None
    sites: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HistoryRow:
    """One distinct event in a job's history (DESIGN 5)."""

    event_id: str
    job_id: str
    kind: str
    site: str | None
    code: str | None
    return_code: int | None
    action: str
    outcome: Outcome
    status_before: JobStatus | None
    status_after: JobStatus | None
    occurred_at: datetime
    recorded_at: datetime
    policy: PolicyRef | None
    duplicates: int = 0

    def as_json(self) -> dict[str, object]:
        """The row as ``jobs show --json`` prints it."""
        return {
            "event_id": self.event_id,
            "kind": self.kind,
            "site": self.site,
            "code": self.code,
            "return_code": self.return_code,
            "action": self.action,
            "outcome": self.outcome.value,
            "status_before": _status(self.status_before),
            "status_after": _status(self.status_after),
            "occurred_at": _time(self.occurred_at),
            "recorded_at": _time(self.recorded_at),
            "policy": _policy(self.policy),
            "duplicates": self.duplicates,
        }


def _status(status: JobStatus | None) -> str | None:
    return status.value if status is not None else None


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _policy(ref: PolicyRef | None) -> dict[str, str] | None:
    # A literal rather than model_dump(): this runs for every row a large replay prints.
    return None if ref is None else {"name": ref.name, "version": ref.version, "rule": ref.rule}


def _outcome(job: Job, event: JobEvent) -> Outcome:
    if job.status is not None and job.status.terminal:
        return Outcome.IGNORED_TERMINAL
    if isinstance(event, Transition):
        if job.sites and event.cause.site not in job.sites:
            return Outcome.IGNORED_FOREIGN_SITE
        return Outcome.APPLIED
    if job.status is not None and event.status.rank <= job.status.rank:
        return Outcome.IGNORED_BACKWARD
    return Outcome.APPLIED


def _next(job: Job, event: JobEvent) -> Job:
    # Plain constructors rather than dataclasses.replace: this runs once per event.
    if isinstance(event, Transition):
        return Job(job.job_id, event.target_status, job.sites)
    sites = job.sites or (tuple(event.sites) if event.sites else None)
    return Job(job.job_id, event.status, sites)


def apply(job: Job, event: JobEvent, recorded_at: datetime) -> tuple[Job, HistoryRow]:
    """The job after ``event`` and the history row recording what it did."""
    outcome = _outcome(job, event)
    after = _next(job, event) if outcome is Outcome.APPLIED else job
    return after, _row(job, after, event, outcome, recorded_at)


def _row(
    before: Job, after: Job, event: JobEvent, outcome: Outcome, recorded_at: datetime
) -> HistoryRow:
    event_id = str(event.event_id)
    if isinstance(event, Transition):
        cause = event.cause
        return HistoryRow(
            event_id, event.job_id, "transition", cause.site, cause.code.name,
            cause.return_code, event.action.value, outcome, before.status, after.status,
            cause.occurred_at, recorded_at, event.policy,
        )  # fmt: skip
    return HistoryRow(
        event_id, event.job_id, "lifecycle", None, None, None, event.status.value, outcome,
        before.status, after.status, event.occurred_at, recorded_at, None,
    )  # fmt: skip
