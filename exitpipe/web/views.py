"""What the dashboard's pages show, computed from what the store, archive and broker said. Pure.

Nothing here escapes text: the templates do, every time (Jinja2 autoescaping), and nothing
here builds markup, so a job id, a site or a reason that came from a message is only ever
text on a page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from consumers.explain import rc_text
from consumers.policy import Decision
from consumers.state import HistoryRow, Outcome
from consumers.store import Cursor, JobSummary, JobView, PageQuery
from schemas.codes import Action, JobStatus
from schemas.events import ExitEvent

SERVER_LANE = "server"
PAGE_SIZES = range(1, 201)
DEFAULT_PAGE_SIZE = 50
_MARGIN = 2.0  # percent of the lane left empty at each end, so a mark is never cut in half


class BadQuery(ValueError):
    """A query parameter the dashboard cannot use; the message names it."""


# -- the jobs page -----------------------------------------------------------------------------


def page_query(params: Mapping[str, str]) -> PageQuery:
    """The store query of ``/?status=..&disagreements=1&q=..&after=..&size=..``."""
    status = params.get("status") or None
    try:
        parsed_status = JobStatus(status) if status else None
    except ValueError:
        raise BadQuery(f"status: {status!r} is not a job status") from None
    size = params.get("size") or str(DEFAULT_PAGE_SIZE)
    if not size.isdigit() or int(size) not in PAGE_SIZES:
        raise BadQuery(f"size: must be a whole number from 1 to {PAGE_SIZES[-1]}")
    after = params.get("after")
    return PageQuery(
        status=parsed_status,
        disagreements=params.get("disagreements") in ("1", "on", "true"),
        prefix=(params.get("q") or "").strip()[:128],
        after=parse_cursor(after) if after else None,
        size=int(size),
    )


def cursor_text(job: JobSummary) -> str:
    """The ``after`` parameter of the page that follows ``job``: ``<updated_at>~<job_id>``."""
    return f"{job.updated_at.isoformat()}~{job.job_id}"


def parse_cursor(text: str) -> Cursor:
    """The inverse of ``cursor_text``; BadQuery for anything else."""
    when, sep, job_id = text.rpartition("~")
    try:
        updated_at = datetime.fromisoformat(when)
    except ValueError:
        updated_at = None
    if not sep or not job_id or updated_at is None or updated_at.tzinfo is None:
        raise BadQuery("after: not a cursor of this dashboard (follow the page links)")
    return Cursor(updated_at, job_id)


@dataclass(frozen=True)
class JobsPage:
    """One page of the jobs table, and the cursor of the next page (None on the last)."""

    jobs: list[JobSummary]
    next_after: str | None


def jobs_page(found: Sequence[JobSummary], size: int) -> JobsPage:
    """A page from ``size + 1`` jobs read: the extra one only says that more follow."""
    jobs = list(found[:size])
    more = len(found) > size and jobs
    return JobsPage(jobs, cursor_text(jobs[-1]) if more else None)


# -- one job -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """One event on a lane: where (percent of the lane), what it did, and its description."""

    x: float
    kind: str  # applied | ignored | duplicate | unrecorded: the CSS class ev-<kind>
    text: str
    event_id: str


@dataclass(frozen=True)
class Lane:
    """The server's lane or one site's: its events, oldest first."""

    name: str
    marks: tuple[Mark, ...]


@dataclass(frozen=True)
class Timeline:
    """A job's events placed in time, one lane for the server and one per site."""

    lanes: tuple[Lane, ...]
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True)
class ExitLine:
    """An exit the archive holds, what the configured policy decides of it, and its row."""

    event: ExitEvent
    decision: Decision
    row: HistoryRow | None  # the store's row of its transition; None if it never got one


def exit_lines(job: JobView, exits: Iterable[tuple[ExitEvent, Decision]]) -> list[ExitLine]:
    """Each exit with the history row its transition made (same event id), if any."""
    rows = {row.event_id: row for row in job.history}
    return [ExitLine(e, d, rows.get(str(e.event_id))) for e, d in exits]


def timeline(job: JobView, exits: Sequence[ExitLine]) -> Timeline:
    """The job's history rows and archived exits on a lane each, coloured by what they did.

    A history row is ``applied`` or ``ignored`` (terminal, backward, foreign site); a row
    that arrived again adds a ``duplicate`` mark beside it. An exit that made no row is
    ``ignored`` when the policy ignores it, else ``unrecorded`` (not in the store, yet).
    """
    reasons = {str(line.event.event_id): line.event.reason for line in exits}
    placed: list[tuple[str, datetime, str, str, str]] = []  # lane, time, kind, text, id
    for row in job.history:
        lane = SERVER_LANE if row.kind == "lifecycle" else row.site or "?"
        kind = "applied" if row.outcome is Outcome.APPLIED else "ignored"
        text = _row_text(row, reasons.get(row.event_id))
        placed.append((lane, row.occurred_at, kind, text, row.event_id))
        if row.duplicates:
            again = f"{row.event_id[:8]} arrived {row.duplicates} more time(s): no effect"
            placed.append((lane, row.occurred_at, "duplicate", again, row.event_id))
    for line in exits:
        if line.row is None:
            placed.append(_exit_mark(line))
    return _laid_out(placed, job.sites or ())


def _row_text(row: HistoryRow, reason: str | None) -> str:
    when = row.occurred_at.strftime("%H:%M:%S")
    if row.kind == "lifecycle":
        what = f"lifecycle {row.action}"
    else:
        rule = f" by {row.policy.name}:{row.policy.rule}" if row.policy else ""
        what = f"{row.site} {row.code}{rc_text(row.return_code)}: {row.action}{rule}"
    text = f"{when} {what}: {row.outcome.value}"
    return f"{text} ({reason})" if reason else text


def _exit_mark(line: ExitLine) -> tuple[str, datetime, str, str, str]:
    event, decision = line.event, line.decision
    ignored = decision.action is Action.IGNORE
    what = "not reported" if ignored else f"{decision.action.value}, not in the store"
    text = (
        f"{event.occurred_at.strftime('%H:%M:%S')} {event.site} {event.effective_code.name}"
        f"{rc_text(event.return_code)}: {what} ({decision.policy.rule})"
    )
    if event.reason:
        text += f" ({event.reason})"
    kind = "ignored" if ignored else "unrecorded"
    return event.site, event.occurred_at, kind, text, str(event.event_id)


def _laid_out(
    placed: Sequence[tuple[str, datetime, str, str, str]], sites: Sequence[str]
) -> Timeline:
    if not placed:
        return Timeline((), None, None)
    times = [when for _, when, *_ in placed]
    start, end = min(times), max(times)
    span = (end - start).total_seconds()
    names = [SERVER_LANE, *sites]
    names += sorted({lane for lane, *_ in placed} - set(names))
    lanes = []
    for name in names:
        marks = [
            Mark(_x(when, start, span, kind), kind, text, event_id)
            for lane, when, kind, text, event_id in sorted(placed, key=lambda p: p[1])
            if lane == name
        ]
        lanes.append(Lane(name, tuple(marks)))
    return Timeline(tuple(lanes), start, end)


def _x(when: datetime, start: datetime, span: float, kind: str) -> float:
    share = (when - start).total_seconds() / span if span > 0 else 0.5
    x = _MARGIN + share * (100 - 2 * _MARGIN)
    if kind == "duplicate":  # beside its event, not on top of it
        x += _MARGIN / 2
    return round(x, 2)


# -- dead letters and health -------------------------------------------------------------------


def reason_counts(reasons: Iterable[str]) -> list[tuple[str, int]]:
    """How many dead letters give each reason, the most common first."""
    return sorted(Counter(reasons).items(), key=lambda item: (-item[1], item[0]))


def rate(before: float | None, after: float, seconds: float) -> float | None:
    """Per-second rate of a counter between two samples; None without a usable earlier one.

    A counter that went down was reset (the daemon restarted): its new value counts from 0.
    """
    if before is None or seconds <= 0:
        return None
    grown = after - before if after >= before else after
    return grown / seconds
