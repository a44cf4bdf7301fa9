"""What the store adapters share: the clock, UTC times, history columns, URL redaction.

Every store keeps and returns times in UTC, so the same events give equal rows (and equal
``jobs show --json``) whichever store recorded them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from consumers.state import HistoryRow, Job, Outcome
from consumers.store import PageQuery, StoreError, prefix_bounds
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


# A job disagrees when the server's verdict is known and differs. Written the same way in the
# queries and in the partial index that serves them: SQLite uses a partial index only for a
# query that repeats its WHERE terms.
DISAGREES = "server_status IS NOT NULL AND server_status <> status"


@dataclass(frozen=True)
class PageSql:
    """How one SQL dialect writes a page query."""

    mark: Callable[[str], str]  # a named parameter: ":name" or "%(name)s"
    time: Callable[[datetime], Any]  # a cursor's time as the column holds it
    job_id: str = "job_id"  # the job id as it is ordered (PostgreSQL: in the "C" collation)
    where: tuple[str, ...] = ()  # conditions every page has
    # A column as a condition that must not pick the index (SQLite's unary +): with a prefix
    # the job id's own index must serve the page, or the planner may sort every match.
    unindexed: Callable[[str], str] = str


def page_query(query: PageQuery, sql: PageSql) -> tuple[str, dict[str, Any]] | None:
    """``WHERE .. ORDER BY .. LIMIT ..`` of one page, and its parameters; None if none match.

    Every page is read in the order of an index (see the stores' migrations) and stops after
    ``size`` rows: (updated_at, job_id), (status, updated_at, job_id), the partial index of
    the disagreeing jobs, or, with a prefix, the job id's own index from the cursor on.
    """
    check_limit(query.size)
    m, job_id, after = sql.mark, sql.job_id, query.after
    where = list(sql.where)
    values: dict[str, Any] = {"size": query.size}
    col = sql.unindexed if query.prefix else str
    if query.status is not None:
        # With disagreements asked for, their (small) partial index serves the page instead.
        status = sql.unindexed("status") if query.disagreements else col("status")
        where.append(f"{status} = {m('status')}")
        values["status"] = query.status.value
    if query.disagreements:
        where.append(DISAGREES if not query.prefix else _disagrees(col))
    if query.prefix:
        bounds = prefix_bounds(query.prefix)
        if bounds is None:
            return None
        low, values["high"] = bounds
        # One lower bound, so that the index range starts at the cursor, not at the prefix.
        if after is not None and after.job_id >= low:
            where.append(f"{job_id} > {m('low')}")
            values["low"] = after.job_id
        else:
            where.append(f"{job_id} >= {m('low')}")
            values["low"] = low
        where.append(f"{job_id} < {m('high')}")
        order = job_id
    else:
        if after is not None:
            where.append(f"(updated_at, {job_id}) < ({m('after_at')}, {m('after_id')})")
            values["after_at"], values["after_id"] = sql.time(after.updated_at), after.job_id
        order = f"updated_at DESC, {job_id} DESC"
    text = f"WHERE {' AND '.join(where) or 'TRUE'} ORDER BY {order} LIMIT {m('size')}"
    return text, values


def _disagrees(col: Callable[[str], str]) -> str:
    return f"{col('server_status')} IS NOT NULL AND {col('server_status')} <> status"
