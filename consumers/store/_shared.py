"""What the store adapters share: the clock, UTC times, history columns, URL redaction.

Every store keeps and returns times in UTC, so the same events give equal rows (and equal
``jobs show --json``) whichever store recorded them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from consumers.state import HistoryRow, Job, Outcome
from consumers.store import StoreError
from schemas.codes import JobStatus
from schemas.events import PolicyRef

Clock = Callable[[], datetime]
REDACTED = "***"

HISTORY_COLUMNS = (
    "event_id",
    "job_id",
    "kind",
    "site",
    "code",
    "return_code",
    "action",
    "outcome",
    "status_before",
    "status_after",
    "occurred_at",
    "recorded_at",
    "policy",
    "duplicates",
)


def utc_now() -> datetime:
    """The default clock: now, in UTC."""
    return datetime.now(UTC)


def utc(value: datetime) -> datetime:
    """``value`` as a UTC time (the instant is unchanged)."""
    return value.astimezone(UTC)


def normalised(row: HistoryRow) -> HistoryRow:
    """``row`` with its times in UTC, as a store returns it."""
    if row.occurred_at.tzinfo is UTC and row.recorded_at.tzinfo is UTC:
        return row  # the common case; dataclasses.replace is costly on the hot path
    return replace(row, occurred_at=utc(row.occurred_at), recorded_at=utc(row.recorded_at))


def status_or_none(value: str | None) -> JobStatus | None:
    """A stored status column back as a JobStatus (NULL stays None)."""
    return JobStatus(value) if value is not None else None


def sites_or_none(value: Any) -> tuple[str, ...] | None:
    """A stored sites list back as the tuple ``Job.sites`` holds (NULL stays None)."""
    return tuple(value) if value is not None else None


def job_from(job_id: str, status: str | None, sites: Any) -> Job:
    """A ``Job`` from its stored columns."""
    return Job(job_id=job_id, status=status_or_none(status), sites=sites_or_none(sites))


def row_values(row: HistoryRow) -> dict[str, Any]:
    """The row as column values: enums as text, times in UTC, policy as a plain dict."""
    return {
        "event_id": row.event_id,
        "job_id": row.job_id,
        "kind": row.kind,
        "site": row.site,
        "code": row.code,
        "return_code": row.return_code,
        "action": row.action,
        "outcome": row.outcome.value,
        "status_before": row.status_before.value if row.status_before else None,
        "status_after": row.status_after.value if row.status_after else None,
        "occurred_at": utc(row.occurred_at),
        "recorded_at": utc(row.recorded_at),
        "policy": row.policy.model_dump() if row.policy else None,
        "duplicates": row.duplicates,
    }


def row_from(values: Mapping[str, Any]) -> HistoryRow:
    """The inverse of ``row_values``: column values (times as datetimes) back to a row."""
    policy = values["policy"]
    return HistoryRow(
        event_id=str(values["event_id"]),
        job_id=values["job_id"],
        kind=values["kind"],
        site=values["site"],
        code=values["code"],
        return_code=values["return_code"],
        action=values["action"],
        outcome=Outcome(values["outcome"]),
        status_before=status_or_none(values["status_before"]),
        status_after=status_or_none(values["status_after"]),
        occurred_at=utc(values["occurred_at"]),
        recorded_at=utc(values["recorded_at"]),
        policy=PolicyRef.model_validate(policy) if policy is not None else None,
        duplicates=values["duplicates"],
    )


def check_limit(limit: int | None) -> None:
    """Refuse a negative ``limit`` the same way in every store."""
    if limit is not None and limit < 0:
        raise StoreError(f"limit must be 0 or more, not {limit}")


def redact_url(url: str) -> str:
    """``url`` with any password (in the user part or a ``password=`` query) shown as ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{REDACTED}@{host}"
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            hidden = [(k, REDACTED if k == "password" else v) for k, v in pairs]
            query = urlencode(hidden, safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable URL>"
