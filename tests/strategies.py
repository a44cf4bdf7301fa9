"""Builders and hypothesis strategies for job events over a small pool of jobs and sites.

A small pool makes collisions likely: the same job seen by many events, sites that are known
and then violated, events redelivered in any order.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import strategies as st

from consumers.state import HistoryRow, JobEvent
from consumers.store import Store
from schemas.codes import TARGET_STATUS, Action, Code, JobStatus
from schemas.events import Cause, LifecycleEvent, PolicyRef, Transition

JOB_IDS = ("job-a", "job-b", "job-c")
SITES = ("site-1", "site-2", "site-3")
T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
POLICY = PolicyRef(name="nvflare-2.8", version="1", rule="fail-on-exception")


def transition(
    job_id: str = "job-a",
    site: str = "site-1",
    action: Action = Action.FAIL,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime = T0,
    code: Code = Code.EXCEPTION,
    return_code: int | None = 101,
) -> Transition:
    """A classifier transition caused by ``site``."""
    return Transition(
        event_id=event_id or uuid.uuid4(),
        job_id=job_id,
        action=action,
        target_status=TARGET_STATUS[action],
        cause=Cause(site=site, code=code, return_code=return_code, occurred_at=occurred_at),
        policy=POLICY,
    )


def lifecycle(
    job_id: str = "job-a",
    status: JobStatus = JobStatus.RUNNING,
    sites: Sequence[str] | None = None,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime = T0,
) -> LifecycleEvent:
    """A server lifecycle event."""
    return LifecycleEvent(
        event_id=event_id or uuid.uuid4(),
        job_id=job_id,
        status=status,
        sites=list(sites) if sites is not None else None,
        occurred_at=occurred_at,
    )


def ticking_clock(
    start: datetime = T0, step: timedelta = timedelta(seconds=1)
) -> Callable[[], datetime]:
    """A clock that moves ``step`` forward at every call: deterministic ``recorded_at``."""
    ticks = itertools.count()
    return lambda: start + next(ticks) * step


times = st.datetimes(
    min_value=datetime(2026, 1, 1),
    max_value=datetime(2026, 12, 31),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]),
)
job_ids = st.sampled_from(JOB_IDS)
site_lists = st.one_of(
    st.none(), st.just([]), st.lists(st.sampled_from(SITES), min_size=1, max_size=3, unique=True)
)


@st.composite
def transitions(draw: st.DrawFn) -> Transition:
    """A fail or stop transition of a pooled job, caused by a pooled site (or a stranger)."""
    return transition(
        job_id=draw(job_ids),
        site=draw(st.sampled_from((*SITES, "site-x"))),
        action=draw(st.sampled_from([Action.FAIL, Action.STOP])),
        event_id=draw(st.uuids()),
        occurred_at=draw(times),
        code=draw(st.sampled_from(list(Code))),
        return_code=draw(st.none() | st.integers(-(2**31), 2**31 - 1)),
    )


@st.composite
def lifecycles(draw: st.DrawFn) -> LifecycleEvent:
    """A lifecycle event of a pooled job, any status, with or without sites."""
    return lifecycle(
        job_id=draw(job_ids),
        status=draw(st.sampled_from(list(JobStatus))),
        sites=draw(site_lists),
        event_id=draw(st.uuids()),
        occurred_at=draw(times),
    )


job_events = st.one_of(transitions(), lifecycles())


def distinct_events(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[list[JobEvent]]:
    """Events with distinct ids."""
    return st.lists(
        job_events, min_size=min_size, max_size=max_size, unique_by=lambda e: e.event_id
    )


@st.composite
def redelivered(draw: st.DrawFn, max_size: int = 24) -> list[JobEvent]:
    """Distinct events, some of them repeated, in any interleaving (at-least-once delivery)."""
    base = draw(distinct_events(min_size=1))
    return draw(st.lists(st.sampled_from(base), min_size=1, max_size=max_size))


@st.composite
def batched(draw: st.DrawFn, events: Sequence[JobEvent]) -> list[list[JobEvent]]:
    """``events`` cut, in order, into consecutive batches of random sizes."""
    batches: list[list[JobEvent]] = []
    rest = list(events)
    while rest:
        size = draw(st.integers(1, len(rest)))
        batches.append(rest[:size])
        rest = rest[size:]
    return batches


def first_occurrences(events: Sequence[JobEvent]) -> list[JobEvent]:
    """``events`` without repeated ids, each kept where it first appears."""
    seen: dict[uuid.UUID, JobEvent] = {}
    for event in events:
        seen.setdefault(event.event_id, event)
    return list(seen.values())


def comparable(row: HistoryRow) -> HistoryRow:
    """A row without what redelivery and timing may change (duplicates, recorded_at)."""
    return replace(row, duplicates=0, recorded_at=EPOCH)


def snapshot(store: Store, jobs: Sequence[str] = JOB_IDS) -> dict[str, object]:
    """Each job's status, sites and comparable history (None for jobs never seen)."""
    result: dict[str, object] = {}
    for job_id in jobs:
        view = store.get(job_id)
        rows = tuple(comparable(r) for r in view.history) if view else None
        result[job_id] = (view.status, view.sites, rows) if view else None
    return result
