"""The job state machine of DESIGN 5: exhaustive tables, then the laws as properties.

The tables pin every (status before, event) pair; the properties check what redelivery
relies on, with the in-memory store as the ledger (the store owns duplicates).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.state import Job, JobEvent, Outcome, apply
from consumers.store.memory import MemoryStore
from schemas.codes import Action, JobStatus
from tests.strategies import (
    POLICY,
    T0,
    batched,
    comparable,
    distinct_events,
    first_occurrences,
    job_events,
    lifecycle,
    redelivered,
    snapshot,
    transition,
)

S = JobStatus
APPLIED = Outcome.APPLIED
BACKWARD = Outcome.IGNORED_BACKWARD
TERMINAL = Outcome.IGNORED_TERMINAL
FOREIGN = Outcome.IGNORED_FOREIGN_SITE

BEFORE = [None, *S]  # None: a job not seen before
KINDS = ["fail", "stop", *S]  # two transitions, then a lifecycle event of each status
SITE_SETS = [None, ("site-1", "site-2")]

# A lifecycle event of a non-terminal status on a non-terminal job: forward only, and the same
# status again is not forward.
FORWARD = {
    (None, S.SUBMITTED): APPLIED,
    (None, S.DISPATCHED): APPLIED,
    (None, S.RUNNING): APPLIED,
    (S.SUBMITTED, S.SUBMITTED): BACKWARD,
    (S.SUBMITTED, S.DISPATCHED): APPLIED,
    (S.SUBMITTED, S.RUNNING): APPLIED,
    (S.DISPATCHED, S.SUBMITTED): BACKWARD,
    (S.DISPATCHED, S.DISPATCHED): BACKWARD,
    (S.DISPATCHED, S.RUNNING): APPLIED,
    (S.RUNNING, S.SUBMITTED): BACKWARD,
    (S.RUNNING, S.DISPATCHED): BACKWARD,
    (S.RUNNING, S.RUNNING): BACKWARD,
}
TRANSITION_TARGET = {"fail": S.FINISHED_EXECUTION_EXCEPTION, "stop": S.FINISHED_ABORTED}


def expected(before: JobStatus | None, kind: str | JobStatus) -> tuple[Outcome, JobStatus | None]:
    """DESIGN 5, read off the rules: the outcome and the status after."""
    if before is not None and before.terminal:
        return TERMINAL, before
    if isinstance(kind, str) and kind in TRANSITION_TARGET:
        return APPLIED, TRANSITION_TARGET[kind]
    assert isinstance(kind, JobStatus)
    if kind.terminal:
        return APPLIED, kind  # the server's own verdict ends any non-terminal job
    outcome = FORWARD[(before, kind)]
    return outcome, kind if outcome is APPLIED else before


def event_of(kind: str | JobStatus) -> JobEvent:
    if kind == "fail":
        return transition(action=Action.FAIL, site="site-1")
    if kind == "stop":
        return transition(action=Action.STOP, site="site-1")
    assert isinstance(kind, JobStatus)
    return lifecycle(status=kind)


def test_the_table_covers_every_pair() -> None:
    assert len(BEFORE) == 11
    assert len(KINDS) == 12
    non_terminal = [b for b in BEFORE if b is None or not b.terminal]
    assert {(b, k) for b in non_terminal for k in S if not k.terminal} == set(FORWARD)


@pytest.mark.parametrize("sites", SITE_SETS, ids=["sites-unknown", "sites-known"])
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("before", BEFORE, ids=str)
def test_every_status_and_event(
    before: JobStatus | None, kind: str | JobStatus, sites: tuple[str, ...] | None
) -> None:
    job = Job("job-a", before, sites)
    outcome, status_after = expected(before, kind)

    after, row = apply(job, event_of(kind), T0)

    assert (row.outcome, row.status_after, after.status) == (outcome, status_after, status_after)
    assert row.status_before == before
    assert after.sites == sites  # a lifecycle event without sites never changes them


def test_transition_row_fields() -> None:
    event = transition(action=Action.STOP, site="site-2", return_code=9)
    recorded = T0.replace(hour=13)

    _, row = apply(Job("job-a", S.RUNNING), event, recorded)

    assert row.event_id == str(event.event_id)
    assert (row.job_id, row.kind, row.site, row.action) == ("job-a", "transition", "site-2", "stop")
    assert (row.code, row.return_code, row.policy) == ("EXCEPTION", 9, POLICY)
    assert (row.occurred_at, row.recorded_at, row.duplicates) == (T0, recorded, 0)


def test_lifecycle_row_fields() -> None:
    event = lifecycle(status=S.DISPATCHED, sites=["site-1"])

    _, row = apply(Job("job-a"), event, T0)

    assert (row.kind, row.action, row.outcome) == ("lifecycle", "DISPATCHED", APPLIED)
    assert (row.site, row.code, row.return_code, row.policy) == (None, None, None, None)
    assert (row.status_before, row.status_after) == (None, S.DISPATCHED)


def run(*events: JobEvent, job: Job | None = None) -> tuple[Job, list[Outcome]]:
    """Apply events in order to one job; its final state and each outcome."""
    job = job or Job("job-a")
    outcomes = []
    for event in events:
        job, row = apply(job, event, T0)
        outcomes.append(row.outcome)
    return job, outcomes


def test_sites_come_from_the_first_applied_lifecycle_with_a_list() -> None:
    job, _ = run(lifecycle(status=S.SUBMITTED, sites=["site-1", "site-2"]))
    assert job.sites == ("site-1", "site-2")


def test_later_site_lists_change_nothing() -> None:
    job, outcomes = run(
        lifecycle(status=S.SUBMITTED, sites=["site-1"]),
        lifecycle(status=S.RUNNING, sites=["site-3"]),
    )
    assert (job.status, job.sites, outcomes) == (S.RUNNING, ("site-1",), [APPLIED, APPLIED])


@pytest.mark.parametrize("unknown", [None, []], ids=["absent", "empty"])
def test_absent_or_empty_sites_mean_unknown(unknown: list[str] | None) -> None:
    job, outcomes = run(
        lifecycle(status=S.RUNNING, sites=unknown),
        transition(site="site-anywhere"),
    )
    assert (job.sites, job.status) == (None, S.FINISHED_EXECUTION_EXCEPTION)
    assert outcomes == [APPLIED, APPLIED]


def test_an_empty_list_leaves_room_for_a_later_list() -> None:
    job, _ = run(
        lifecycle(status=S.SUBMITTED, sites=[]),
        lifecycle(status=S.RUNNING, sites=["site-2"]),
    )
    assert job.sites == ("site-2",)


def test_an_ignored_lifecycle_does_not_set_sites() -> None:
    job, outcomes = run(
        lifecycle(status=S.RUNNING),
        lifecycle(status=S.SUBMITTED, sites=["site-1"]),
    )
    assert (job.sites, outcomes) == (None, [APPLIED, BACKWARD])


def test_a_foreign_site_transition_has_no_effect() -> None:
    job, outcomes = run(
        lifecycle(status=S.RUNNING, sites=["site-1", "site-2"]),
        transition(site="site-3", action=Action.FAIL),
        transition(site="site-2", action=Action.STOP),
    )
    assert (job.status, outcomes) == (S.FINISHED_ABORTED, [APPLIED, FOREIGN, APPLIED])


def test_a_foreign_row_records_an_unchanged_status() -> None:
    job = Job("job-a", S.RUNNING, ("site-1",))
    after, row = apply(job, transition(site="site-9"), T0)
    assert after == job
    assert (row.status_before, row.status_after) == (S.RUNNING, S.RUNNING)


@pytest.mark.parametrize("status", [S.RUNNING, S.FINISHED_COMPLETED, S.FINISHED_ABANDONED])
def test_a_lifecycle_event_is_never_foreign(status: JobStatus) -> None:
    job = Job("job-a", S.DISPATCHED, ("site-1",))
    after, row = apply(job, lifecycle(status=status, sites=["site-9"]), T0)
    assert (row.outcome, after.status, after.sites) == (APPLIED, status, ("site-1",))


@pytest.mark.parametrize(
    ("job", "event", "outcome"),
    [
        (Job("j", S.FINISHED_COMPLETED, ("site-1",)), transition("j", site="site-9"), TERMINAL),
        (Job("j", S.FINISHED_ABORTED), lifecycle("j", S.SUBMITTED), TERMINAL),
        (Job("j", S.FINISHED_EXECUTION_EXCEPTION), transition("j", action=Action.STOP), TERMINAL),
        (Job("j", S.RUNNING, ("site-1",)), transition("j", site="site-9"), FOREIGN),
        (Job("j", S.RUNNING, ("site-1",)), lifecycle("j", S.RUNNING, ["site-9"]), BACKWARD),
        (Job("j", S.RUNNING, ("site-1",)), transition("j", site="site-1"), APPLIED),
    ],
    ids=["terminal>foreign", "terminal>backward", "terminal>applied", "foreign", "backward", "ok"],
)
def test_outcome_precedence(job: Job, event: JobEvent, outcome: Outcome) -> None:
    after, row = apply(job, event, T0)
    assert row.outcome == outcome
    assert (after == job) is (outcome is not APPLIED)


def test_a_duplicate_comes_before_terminal() -> None:
    store = MemoryStore()
    fail = transition(site="site-1")
    store.apply_batch([fail, transition(action=Action.STOP)])

    [again] = store.apply_batch([fail])

    view = store.get("job-a")
    assert view is not None
    assert (again.duplicate, again.row.outcome, again.row.duplicates) == (True, APPLIED, 1)
    assert [r.outcome for r in view.history] == [APPLIED, TERMINAL]


def test_the_first_terminal_report_wins() -> None:
    job, outcomes = run(transition(site="site-a"), transition(site="site-b", action=Action.STOP))
    assert (job.status, outcomes) == (S.FINISHED_EXECUTION_EXCEPTION, [APPLIED, TERMINAL])


# ---- laws -----------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(events=redelivered(), data=st.data())
def test_redelivery_in_any_interleaving_equals_the_distinct_events_once(
    events: list[JobEvent], data: st.DataObject
) -> None:
    redelivering, once = MemoryStore(), MemoryStore()
    distinct = first_occurrences(events)

    for batch in data.draw(batched(events)):
        redelivering.apply_batch(batch)
    once.apply_batch(distinct)

    assert snapshot(redelivering) == snapshot(once)
    counted = [r.duplicates for v in map(redelivering.get, _jobs(events)) if v for r in v.history]
    assert sum(counted) == len(events) - len(distinct)


@settings(max_examples=500, deadline=None)
@given(events=redelivered())
def test_one_event_at_a_time_is_a_batch_of_one(events: list[JobEvent]) -> None:
    """``apply_one`` (replay's way) keeps and returns exactly what ``apply_batch`` does."""
    now = datetime(2026, 1, 31, 12, tzinfo=UTC)
    alone, batched_ = MemoryStore(clock=lambda: now), MemoryStore(clock=lambda: now)
    for event in events:
        assert alone.apply_one(event) == batched_.apply_batch([event])[0]
    assert snapshot(alone) == snapshot(batched_)


@settings(max_examples=500, deadline=None)
@given(events=redelivered())
def test_no_event_moves_a_terminal_job(events: list[JobEvent]) -> None:
    store = MemoryStore()
    final: dict[str, JobStatus] = {}
    for event in events:
        store.apply_batch([event])
        view = store.get(event.job_id)
        assert view is not None and view.status is not None
        if event.job_id in final:
            assert view.status == final[event.job_id]
        elif view.status.terminal:
            final[event.job_id] = view.status


@settings(max_examples=500, deadline=None)
@given(status=st.sampled_from(sorted(S, key=str)), event=job_events)
def test_apply_leaves_a_terminal_job_alone(status: JobStatus, event: JobEvent) -> None:
    job = Job(event.job_id, status, ("site-1",))
    after, row = apply(job, event, T0)
    if status.terminal:
        assert (after, row.outcome, row.status_after) == (job, TERMINAL, status)


@settings(max_examples=500, deadline=None)
@given(events=st.one_of(redelivered(), distinct_events()))
def test_twice_equals_once(events: list[JobEvent]) -> None:
    twice, once = MemoryStore(), MemoryStore()

    results_twice = twice.apply_batch(events + events)
    results_once = once.apply_batch(events)

    assert snapshot(twice) == snapshot(once)
    first = [(a.duplicate, comparable(a.row)) for a in results_twice[: len(events)]]
    assert first == [(a.duplicate, comparable(a.row)) for a in results_once]
    assert all(a.duplicate for a in results_twice[len(events) :])


def _jobs(events: list[JobEvent]) -> list[str]:
    return sorted({e.job_id for e in events})


def test_strategies_reach_every_outcome() -> None:
    """A guard on the strategies: random events do meet every outcome."""
    seen: set[Outcome] = set()

    @settings(max_examples=300, deadline=None)
    @given(events=distinct_events(min_size=4))
    def collect(events: list[JobEvent]) -> None:
        store = MemoryStore()
        seen.update(a.row.outcome for a in store.apply_batch(events))

    collect()
    assert seen == set(Outcome)


def test_every_kind_pair_is_listed_once() -> None:
    pairs = list(itertools.product(BEFORE, KINDS))
    assert len(pairs) == len(set(pairs)) == 132
