"""Replay, pure: timelines, final states, comparison of two policies, reading JSON lines.

The stories are the demo's (``exitpipe.demo.scenario``), so the expectations are the same
ones the daemons are held to in the integration tests.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.archive import _Bounds, parse_start, parse_time
from consumers.dead_letters import dead_message, route_back
from consumers.policy import BUILTINS, parse_policy
from consumers.replay import (
    DUPLICATE,
    NOT_REPORTED,
    Checks,
    Replay,
    Unreadable,
    compare,
    parse_archived,
    parse_lines,
    replay,
)
from exitpipe.demo import Story, scenario
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import Event, ExitEvent, LifecycleEvent
from schemas.topology import Names
from tests.strategies import T0, transition

NARROW = BUILTINS["nvflare-2.8"]
LEGACY = BUILTINS["nvflare-2.8-legacy"]
S = JobStatus


def _exit(job: str, site: str, code: Code, rc: int | None = None, at: datetime = T0) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(), job_id=job, site=site, code=code, return_code=rc, occurred_at=at
    )


def _life(job: str, status: JobStatus, sites: list[str] | None = None) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=uuid.uuid4(), job_id=job, status=status, sites=sites, occurred_at=T0
    )


def _started(job: str, sites: list[str] | None = None) -> list[Event]:
    return [_life(job, S.SUBMITTED, sites), _life(job, S.DISPATCHED), _life(job, S.RUNNING)]


def _teardown(job: str = "teardown") -> list[Event]:
    return [
        *_started(job),
        _exit(job, "site-2", Code.EXECUTION_ERROR, 1),
        _life(job, S.FINISHED_COMPLETED),
    ]


def _demo_events() -> tuple[list[Story], list[Event]]:
    stories = scenario("u")
    events: list[Event] = [e for s in stories for e in s.events]
    return stories, events + [e for s in stories for e in s.late]


# -- timelines ---------------------------------------------------------------------------------


def test_an_ignored_exit_is_in_the_timeline_but_never_reaches_the_store() -> None:
    result = replay(_teardown(), NARROW)
    steps = result.timelines["teardown"]
    assert [s.outcome for s in steps] == ["applied"] * 3 + [NOT_REPORTED, "applied"]
    ignored = steps[3]
    assert ignored.decision is not None and ignored.decision.policy.rule == "default"
    assert (ignored.status_before, ignored.status_after) == (S.RUNNING, S.RUNNING)
    assert result.status("teardown") is S.FINISHED_COMPLETED
    view = result.view("teardown")
    assert view is not None and [r.kind for r in view.history] == ["lifecycle"] * 4


def test_the_legacy_policy_fails_the_job_on_teardown_noise() -> None:
    steps = replay(_teardown(), LEGACY).timelines["teardown"]
    assert [(s.outcome, s.status_after) for s in steps[3:]] == [
        ("applied", S.FINISHED_EXECUTION_EXCEPTION),
        ("ignored_terminal", S.FINISHED_EXECUTION_EXCEPTION),
    ]
    assert steps[3].decision is not None and steps[3].decision.policy.rule == "fail-on-exception"


def test_every_demo_story_ends_as_the_daemons_must_end_it() -> None:
    stories, events = _demo_events()
    result = replay(events, NARROW)
    assert {s.job_id: result.status(s.job_id) for s in stories} == {
        s.job_id: s.expected for s in stories
    }


def test_a_redelivered_exit_is_decided_again_and_the_store_counts_a_duplicate() -> None:
    events = [*_started("dup"), _exit("dup", "site-1", Code.EXCEPTION, 101)]
    events.append(events[-1])
    result = replay(events, NARROW)
    assert [s.outcome for s in result.timelines["dup"][-2:]] == ["applied", DUPLICATE]
    view = result.view("dup")
    assert view is not None and view.history[-1].duplicates == 1


def test_archived_transitions_are_kept_for_comparison_and_never_applied() -> None:
    live = transition("live-only")
    result = replay([live], NARROW)
    assert result.live == {live.event_id: live}
    assert result.timelines == {} and result.view("live-only") is None
    assert result.events == 1


def test_a_job_seen_only_through_ignored_exits_has_a_timeline_and_no_state() -> None:
    result = replay([_exit("quiet", "site-1", Code.SUCCESS, 0)], NARROW)
    assert [s.outcome for s in result.timelines["quiet"]] == [NOT_REPORTED]
    assert result.status("quiet") is None and result.view("quiet") is None


def test_events_are_taken_in_the_order_given_never_re_sorted() -> None:
    late_first: list[Event] = [
        _life("order", S.RUNNING),
        _exit("order", "site-1", Code.EXCEPTION, 101, at=T0 + timedelta(hours=1)),
        _life("order", S.FINISHED_COMPLETED),  # occurred earlier, applied later: too late
    ]
    assert replay(late_first, NARROW).status("order") is S.FINISHED_EXECUTION_EXCEPTION


def test_replaying_twice_gives_identical_output() -> None:
    _, events = _demo_events()
    a, b = replay(events, NARROW), replay(events, NARROW)
    assert _views(a) == _views(b)


def _views(result: Replay) -> list[dict[str, object]]:
    return [v.as_json() for j in result.timelines if (v := result.view(j)) is not None]


def test_each_row_is_recorded_at_its_event_time() -> None:
    view = replay(_teardown(), NARROW).view("teardown")
    assert view is not None and {r.recorded_at for r in view.history} == {T0}


# -- comparing ---------------------------------------------------------------------------------


def test_compare_names_exactly_the_teardown_job_with_its_event_and_rules() -> None:
    stories, events = _demo_events()
    teardown = next(s for s in stories if s.job_id.endswith("-teardown"))
    noise = next(e for e in teardown.events if isinstance(e, ExitEvent))
    (difference,) = compare(replay(events, NARROW), replay(events, LEGACY))
    assert difference.as_json() == {
        "job_id": teardown.job_id,
        "status": "FINISHED:COMPLETED",
        "other_status": "FINISHED:EXECUTION_EXCEPTION",
        "event_id": str(noise.event_id),
        "rule": "default",
        "other_rule": "fail-on-exception",
    }


def test_compare_of_a_policy_with_itself_finds_nothing() -> None:
    _, events = _demo_events()
    assert compare(replay(events, NARROW), replay(events, NARROW)) == []


def test_compare_passes_over_a_different_decision_that_changed_nothing() -> None:
    foreign = _exit("j", "site-9", Code.EXECUTION_ERROR, 1)  # not one of the job's sites
    noise = _exit("j", "site-1", Code.EXECUTION_ERROR, 1)
    events = [*_started("j", ["site-1"]), foreign, noise, _life("j", S.FINISHED_COMPLETED)]
    (difference,) = compare(replay(events, NARROW), replay(events, LEGACY))
    assert difference.event_id == str(noise.event_id)


def test_compare_counts_a_job_the_store_never_saw_under_one_policy() -> None:
    events: list[Event] = [_exit("only-exit", "site-1", Code.EXECUTION_ERROR, 1)]
    (difference,) = compare(replay(events, NARROW), replay(events, LEGACY))
    assert (difference.status, difference.other_status) == (None, S.FINISHED_EXECUTION_EXCEPTION)
    assert difference.as_json()["status"] is None


ACTIONS = st.sampled_from([Code.SUCCESS, Code.EXECUTION_ERROR, Code.EXCEPTION, Code.ABORTED])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), ACTIONS), max_size=12))
def test_compare_names_exactly_the_jobs_whose_final_status_differs(
    exits: list[tuple[str, Code]],
) -> None:
    events: list[Event] = [e for job in "abc" for e in _started(job)]
    events += [_exit(job, "site-1", code, int(code)) for job, code in exits]
    a, b = replay(events, NARROW), replay(events, LEGACY)
    differing = {d.job_id for d in compare(a, b)}
    assert differing == {j for j in "abc" if a.status(j) != b.status(j)}
    for d in compare(a, b):
        assert d.step is not None and d.other_step is not None
        assert d.step.event is d.other_step.event
        assert d.step.decision != d.other_step.decision


def test_compare_with_a_policy_file_reports_its_rule_ids() -> None:
    k8s = parse_policy(
        'name = "k8s"\nversion = 2\n[[rules]]\nid = "oom"\naction = "fail"\n'
        'values = { operator = "In", values = [137] }\nlaunchers = ["k8s"]\n'
    )
    oom = ExitEvent(
        event_id=uuid.uuid4(),
        job_id="oom",
        site="site-1",
        launcher=Launcher.K8S,
        code=Code.EXECUTION_ERROR,
        return_code=137,
        occurred_at=T0,
    )
    (difference,) = compare(replay([oom], NARROW), replay([oom], k8s))
    assert (difference.rule, difference.other_rule) == ("default", "oom")


# -- reading -----------------------------------------------------------------------------------


def test_bad_lines_are_reported_by_number_and_reason_and_the_rest_is_read() -> None:
    good = [e.to_json() for e in _teardown()]
    lines = [
        good[0] + b"\n",
        b"{not json\n",
        b"\n",  # blank: skipped silently
        good[1] + b"\n",
        json.dumps({"schema": "exitpipe.exit/9", "job_id": "x"}).encode() + b"\n",
        good[2].replace(b'"job_id":"teardown"', b'"job_id":"bad job"') + b"\n",
        b"\xff\xfe\n",
        *(line + b"\n" for line in good[3:]),
    ]
    items = list(parse_lines(lines, Checks(Names("ns"))))
    bad = [i for i in items if isinstance(i, Unreadable)]
    assert [b.where for b in bad] == ["line 2", "line 5", "line 6", "line 7"]
    assert bad[0].reason.startswith("body: not JSON")
    assert "schema" in bad[1].reason
    assert bad[2].reason.startswith("job_id:")
    assert "not UTF-8" in bad[3].reason
    events = [i for i in items if not isinstance(i, Unreadable)]
    assert len(events) == 4
    assert replay(events, NARROW).status("teardown") is S.FINISHED_COMPLETED


def test_archived_bodies_are_named_by_offset() -> None:
    messages = [
        SimpleNamespace(offset=offset, routing_key=key, body=body, user_id=None, headers=None)
        for offset, key, body in [
            (7, "exit.site-1", b"[]"),
            (8, "lifecycle.SUBMITTED", _teardown()[0].to_json()),
        ]
    ]
    items = list(parse_archived(messages, Checks(Names("ns"))))
    assert items[0] == Unreadable("offset 7", "body: not a JSON object")
    assert isinstance(items[1], LifecycleEvent)


NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first", "first"),
        ("last", "last"),
        ("0", 0),
        ("1234", 1234),
        ("30s", NOW - timedelta(seconds=30)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        ("1w", NOW - timedelta(weeks=1)),
        ("2026-01-30T10:00:00Z", datetime(2026, 1, 30, 10, tzinfo=UTC)),
        ("2026-01-30T12:00:00+02:00", datetime(2026, 1, 30, 10, tzinfo=UTC)),
    ],
)
def test_start_positions(text: str, expected: object) -> None:
    assert parse_start(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-01-30T10:00:00", "-5", "2x", ""])
def test_a_time_without_an_offset_or_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time(text, NOW)


def test_a_read_keeps_what_its_window_holds_and_ends_at_the_end() -> None:
    at = int(NOW.timestamp())
    bounds = _Bounds.of(NOW, NOW + timedelta(minutes=1), end=10)
    assert bounds.wanted(5, at) and bounds.wanted(5, None) and bounds.wanted(5, at + 60)
    assert not bounds.wanted(5, at - 1) and not bounds.wanted(5, at + 61)
    assert bounds.past(11, at) and bounds.past(5, at + 60 + 61) and not bounds.past(10, at + 61)
    from_offset = _Bounds.of(7, None, end=10)
    assert not from_offset.wanted(6, at) and from_offset.wanted(7, 0)


# -- dead letters (the pure part) --------------------------------------------------------------

NAMES = Names("ns")


def _props(
    headers: dict[str, Any] | None, message_id: str = "m-1", user_id: str | None = None
) -> Any:
    return SimpleNamespace(headers=headers, message_id=message_id, user_id=user_id)


def test_a_dead_letter_from_a_consumer_names_its_reason_and_source() -> None:
    message = dead_message(
        NAMES,
        1,
        "lifecycle.RUNNING",
        _props({"x-exitpipe-error": "status: bad", "x-exitpipe-source": NAMES.job_state}),
        b"{}",
    )
    assert (message.reason, message.source, message.count) == ("status: bad", "ns.job-state", 0)
    assert route_back(NAMES, message) == ("ns.jobs", "lifecycle.RUNNING")


def test_a_dead_letter_from_the_delivery_limit_is_read_from_x_death() -> None:
    death = {"count": 1, "reason": "delivery_limit", "queue": NAMES.classify}
    death["routing-keys"] = ["exit.site-1"]
    message = dead_message(NAMES, 2, "exit.site-1", _props({"x-death": [death]}), b"\x00body")
    assert (message.reason, message.source, message.count) == ("delivery_limit", "ns.classify", 1)
    assert route_back(NAMES, message) == ("ns.events", "exit.site-1")
    assert message.preview() == "\\x00body"


def test_a_dead_letter_of_unknown_origin_is_not_routed_back() -> None:
    message = dead_message(NAMES, 3, "x", _props(None), b"")
    assert (message.reason, message.source) == ("unknown", None)
    assert route_back(NAMES, message) is None
