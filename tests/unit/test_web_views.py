"""The dashboard's pure parts: query parsing, cursors, the timeline, counts, rates, the why."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from consumers.explain import NOTHING_APPLIED, why
from consumers.policy import decide, load_policy
from consumers.store import Cursor, JobSummary, PageQuery
from consumers.store.memory import MemoryStore
from exitpipe.web import views
from exitpipe.web.sources import parse_metrics
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import ExitEvent
from tests.strategies import T0, lifecycle, ticking_clock, transition

S = JobStatus
POLICY = load_policy("nvflare-2.8")


def _exit(job: str, site: str, code: Code, at: datetime, reason: str | None = None) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=1,
        launcher=Launcher.PROCESS,
        reason=reason,
        occurred_at=at,
    )


# -- the jobs page query -----------------------------------------------------------------------


def test_an_empty_query_is_the_first_page_of_everything() -> None:
    assert views.page_query({}) == PageQuery(size=views.DEFAULT_PAGE_SIZE)


def test_a_query_reads_every_filter() -> None:
    cursor = views.cursor_text(JobSummary("job-9", S.RUNNING, T0))
    query = views.page_query(
        {"status": "RUNNING", "disagreements": "1", "q": "  job-", "after": cursor, "size": "7"}
    )
    assert query == PageQuery(S.RUNNING, True, "job-", Cursor(T0, "job-9"), 7)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "DONE"}, "status"),
        ({"size": "0"}, "size"),
        ({"size": "201"}, "size"),
        ({"size": "-1"}, "size"),
        ({"after": "yesterday~job-1"}, "after"),
        ({"after": "2026-01-31T12:00:00~job-1"}, "after"),  # no offset: not ours
        ({"after": "2026-01-31T12:00:00+00:00~"}, "after"),
    ],
)
def test_a_bad_parameter_is_named(params: dict[str, str], field: str) -> None:
    with pytest.raises(views.BadQuery, match=f"^{field}:"):
        views.page_query(params)


def test_a_cursor_goes_round() -> None:
    job = JobSummary("a:b.c-1", S.RUNNING, T0 + timedelta(microseconds=7))
    assert views.parse_cursor(views.cursor_text(job)) == Cursor(job.updated_at, job.job_id)


def test_a_page_has_a_next_cursor_only_when_more_follow() -> None:
    jobs = [JobSummary(f"job-{n}", S.RUNNING, T0) for n in range(3)]
    assert views.jobs_page(jobs, 2).jobs == jobs[:2]
    assert views.jobs_page(jobs, 2).next_after == views.cursor_text(jobs[1])
    assert views.jobs_page(jobs[:2], 2).next_after is None
    assert views.jobs_page([], 2) == views.JobsPage([], None)


# -- one job's timeline ------------------------------------------------------------------------


def _job_with_everything() -> tuple[MemoryStore, list[views.ExitLine]]:
    """site-1 fails the job, site-2's exit is ignored, site-9 is foreign, one duplicate."""
    store = MemoryStore(clock=ticking_clock())
    fail = transition("job-a", site="site-1", occurred_at=T0 + timedelta(seconds=10))
    store.apply_batch(
        [
            lifecycle("job-a", S.RUNNING, ["site-1", "site-2"], occurred_at=T0),
            transition("job-a", site="site-9", occurred_at=T0 + timedelta(seconds=5)),
            fail,
            fail,
            lifecycle("job-a", S.FINISHED_ABNORMAL, occurred_at=T0 + timedelta(seconds=20)),
        ]
    )
    job = store.get("job-a")
    assert job is not None
    ignored = _exit("job-a", "site-2", Code.EXECUTION_ERROR, T0 + timedelta(seconds=2), "<b>x</b>")
    failed = _exit("job-a", "site-1", Code.EXCEPTION, T0 + timedelta(seconds=10), "CUDA")
    failed = failed.model_copy(update={"event_id": uuid.UUID(str(fail.event_id))})
    lost = _exit("job-a", "site-2", Code.EXCEPTION, T0 + timedelta(seconds=15))
    lines = views.exit_lines(job, [(e, decide(e, POLICY)) for e in (ignored, failed, lost)])
    return store, lines


def test_the_timeline_has_the_server_lane_then_the_sites_then_strangers() -> None:
    store, lines = _job_with_everything()
    job = store.get("job-a")
    assert job is not None

    lanes = views.timeline(job, lines).lanes

    assert [lane.name for lane in lanes] == ["server", "site-1", "site-2", "site-9"]
    kinds = {lane.name: [m.kind for m in lane.marks] for lane in lanes}
    assert kinds == {
        "server": ["applied", "ignored"],
        "site-1": ["applied", "duplicate"],
        "site-2": ["ignored", "unrecorded"],
        "site-9": ["ignored"],
    }


def test_marks_are_placed_in_time_between_the_margins() -> None:
    store, lines = _job_with_everything()
    job = store.get("job-a")
    assert job is not None

    timeline = views.timeline(job, lines)

    xs = {lane.name: [m.x for m in lane.marks] for lane in timeline.lanes}
    assert xs["server"] == [2.0, 98.0]  # the first and the last event
    assert xs["site-1"] == [50.0, 51.0]  # half way, and its duplicate beside it
    assert (timeline.start, timeline.end) == (T0, T0 + timedelta(seconds=20))


def test_a_mark_says_what_the_event_did_and_its_reason() -> None:
    store, lines = _job_with_everything()
    job = store.get("job-a")
    assert job is not None
    lanes = {lane.name: lane for lane in views.timeline(job, lines).lanes}

    applied, duplicate = lanes["site-1"].marks
    assert "fail by nvflare-2.8:fail-on-exception: applied (CUDA)" in applied.text
    assert "arrived 1 more time(s): no effect" in duplicate.text
    ignored, unrecorded = lanes["site-2"].marks
    assert "EXECUTION_ERROR rc=1: not reported (default) (<b>x</b>)" in ignored.text
    assert "fail, not in the store" in unrecorded.text
    assert "ignored_foreign_site" in lanes["site-9"].marks[0].text


def test_one_instant_is_the_middle_and_no_event_is_no_lane() -> None:
    store = MemoryStore()
    store.apply_batch([lifecycle("job-b", S.RUNNING)])
    job = store.get("job-b")
    assert job is not None
    assert [m.x for m in views.timeline(job, []).lanes[0].marks] == [50.0]
    empty = job.__class__(job.job_id, job.status, None, job.updated_at, ())
    assert views.timeline(empty, []) == views.Timeline((), None, None)


# -- the why -----------------------------------------------------------------------------------


def test_why_names_the_rule_and_the_server_disagreement() -> None:
    store, _ = _job_with_everything()
    job = store.get("job-a")
    assert job is not None
    assert why(job) == (
        "fail by nvflare-2.8:fail-on-exception (site-1 EXCEPTION rc=101); "
        "server verdict FINISHED:ABNORMAL differs"
    )


def test_why_of_a_server_verdict_and_of_nothing_applied() -> None:
    store = MemoryStore()
    store.apply_batch([lifecycle("job-c", S.RUNNING), lifecycle("job-c", S.FINISHED_COMPLETED)])
    job = store.get("job-c")
    assert job is not None
    assert why(job) == "server verdict FINISHED:COMPLETED"
    nothing = job.__class__(job.job_id, job.status, None, job.updated_at, ())
    assert why(nothing) == NOTHING_APPLIED


# -- dead letters and health -------------------------------------------------------------------


def test_reasons_are_counted_most_common_first() -> None:
    reasons = ["b: bad", "a: bad", "b: bad", "c: bad", "a: bad", "b: bad"]
    assert views.reason_counts(reasons) == [("b: bad", 3), ("a: bad", 2), ("c: bad", 1)]


def test_a_rate_needs_an_earlier_sample_and_survives_a_restart() -> None:
    assert views.rate(None, 10, 5) is None
    assert views.rate(10, 20, 0) is None
    assert views.rate(10, 20, 5) == 2.0
    assert views.rate(100, 6, 3) == 2.0  # the counter was reset: 6 since the restart


def test_metrics_are_summed_per_counter() -> None:
    text = "\n".join(
        [
            'exitpipe_events_total{daemon="classifier",decision="fail",outcome=""} 3.0',
            'exitpipe_events_total{daemon="job-state",decision="",outcome="applied"} 4.0',
            'exitpipe_events_created{daemon="classifier",decision="fail",outcome=""} 1.7e9',
            'exitpipe_dead_lettered_total{daemon="classifier"} 2.0',
            'exitpipe_broker_connected{daemon="classifier"} 1.0',
            'exitpipe_broker_connected{daemon="job-state"} 0.0',
        ]
    )
    totals, connected = parse_metrics(text + "\n")
    assert totals == {"events": 7.0, "dead-lettered": 2.0, "reconnects": 0.0, "store retries": 0.0}
    assert connected == {"classifier": True, "job-state": False}


def test_a_utc_time_is_what_pages_show() -> None:
    from exitpipe.web.app import css_name, when

    assert when(datetime(2026, 1, 31, 13, 0, 5, tzinfo=UTC).astimezone()) == "2026-01-31 13:00:05"
    assert css_name("FINISHED:CAN_NOT_SCHEDULE") == "finished-can-not-schedule"
    assert css_name('<x onerror="y">') == "x-onerror-y"
