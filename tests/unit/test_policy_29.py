"""FLARE 2.9 in the pure core (issue 12): code 104, the worker's stage, rules with ``stages`` and
``status``, exit events /1 and /2, and the built-in ``nvflare-2.9`` that reproduces FLARE 2.9.0.

The built-in is checked exhaustively against DESIGN 2's table: every code, every stage (none,
starting, started), the code given by name, by value, or both.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.policy import (
    BUILTINS,
    PolicyError,
    decide,
    parse_policy,
    to_transition,
    transition_body,
)
from consumers.state import Job, apply
from schemas.codes import Action, Code, JobStatus, Launcher, Stage
from schemas.events import EXIT_SCHEMA, EXIT_SCHEMA_V1, BadMessage, ExitEvent, parse_body
from tests.strategies import T0
from tests.unit.test_schemas import exit_dict

NV29 = BUILTINS["nvflare-2.9"]
S = JobStatus
EXC, ABN, ABT = S.FINISHED_EXECUTION_EXCEPTION, S.FINISHED_ABNORMAL, S.FINISHED_ABORTED


def exit_event(
    code: Code | None = None, return_code: int | None = None, stage: Stage | None = None
) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id="job-1",
        site="site-1",
        code=code,
        return_code=return_code,
        stage=stage,
        occurred_at="2026-01-31T12:00:00Z",
    )


def expected_29(code: Code, value: int, stage: Stage | None) -> tuple[Action, str, S | None]:
    """DESIGN 2's nvflare-2.9 table, written out as a reader would apply it."""
    if code is Code.ABORTED:
        return Action.STOP, "stop-on-abort", ABT
    if stage is Stage.STARTING and value != 0:
        return Action.FAIL, "failed-while-starting", ABN
    if stage is Stage.STARTED and value != 0:
        return Action.FAIL, "failed-while-running", EXC
    if code in (Code.EXCEPTION, Code.CONFIG_ERROR):
        return Action.FAIL, "fail-on-exception", EXC
    if code is Code.INFRASTRUCTURE_ERROR:
        return Action.FAIL, "infrastructure", ABN
    if code is Code.UNSAFE_COMPONENT:
        return Action.STOP, "stop-on-unsafe", ABT
    return Action.IGNORE, "default", None


STAGES = [None, Stage.STARTING, Stage.STARTED]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s or "no-stage")
@pytest.mark.parametrize("code", list(Code), ids=lambda c: c.name)
@pytest.mark.parametrize("form", ["name", "value", "both"])
def test_nvflare_29_decides_as_flare_290(code: Code, stage: Stage | None, form: str) -> None:
    event = {
        "name": exit_event(code=code, stage=stage),
        "value": exit_event(return_code=int(code), stage=stage),
        "both": exit_event(code=code, return_code=int(code), stage=stage),
    }[form]
    action, rule, status = expected_29(code, int(code), stage)
    decision = decide(event, NV29)
    assert (decision.action, decision.policy.rule, decision.target_status) == (action, rule, status)


@given(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from(STAGES),
    st.none() | st.sampled_from(list(Code)),
)
def test_nvflare_29_on_any_raw_exit(value: int, stage: Stage | None, code: Code | None) -> None:
    event = exit_event(code=code, return_code=value, stage=stage)
    action, rule, status = expected_29(event.effective_code, value, stage)
    decision = decide(event, NV29)
    assert (decision.action, decision.policy.rule, decision.target_status) == (action, rule, status)


@pytest.mark.parametrize(
    ("case", "event", "flare_status"),
    [
        # The six cases measured on a real FLARE 2.9.0 deployment (issue 12).
        ("os._exit(103) mid-run", exit_event(Code.CONFIG_ERROR, 103, Stage.STARTED), EXC),
        ("os._exit(1) in teardown", exit_event(Code.EXECUTION_ERROR, 1, Stage.STARTED), EXC),
        ("SIGKILL", exit_event(None, -9, Stage.STARTED), EXC),
        ("ConfigError while starting", exit_event(Code.CONFIG_ERROR, 1, Stage.STARTING), ABN),
        ("admin abort", exit_event(Code.ABORTED, 0, Stage.STARTED), ABT),
    ],
)
def test_nvflare_29_gives_flare_290s_verdict(case: str, event: ExitEvent, flare_status: S) -> None:
    job, row = apply(Job("job-1", S.RUNNING), to_transition(event, decide(event, NV29)), T0)
    assert job.status is flare_status, case
    assert row.outcome.value == "applied"


def test_a_finishing_worker_is_ignored_by_nvflare_29() -> None:
    assert decide(exit_event(Code.SUCCESS, 0, Stage.STARTED), NV29).action is Action.IGNORE


# -- exit/1 and exit/2 ------------------------------------------------------------------------


def test_exit_1_is_still_read_and_has_no_stage() -> None:
    event = parse_body(json.dumps(exit_dict(schema=EXIT_SCHEMA_V1)).encode())
    assert isinstance(event, ExitEvent) and event.stage is None
    with pytest.raises(BadMessage, match=r"^stage: unknown field"):
        parse_body(json.dumps(exit_dict(schema=EXIT_SCHEMA_V1, stage="started")).encode())


@pytest.mark.parametrize("stage", ["starting", "started"])
def test_exit_2_carries_the_stage(stage: str) -> None:
    event = parse_body(json.dumps(exit_dict(schema=EXIT_SCHEMA, stage=stage)).encode())
    assert isinstance(event, ExitEvent) and event.stage is Stage(stage)
    assert json.loads(event.to_json())["stage"] == stage


def test_an_unknown_stage_is_refused_naming_the_field() -> None:
    with pytest.raises(BadMessage, match=r"^stage:"):
        parse_body(json.dumps(exit_dict(stage="running")).encode())


def test_104_is_infrastructure_error() -> None:
    event = parse_body(json.dumps(exit_dict(code=None, return_code=104)).encode())
    assert isinstance(event, ExitEvent) and event.effective_code is Code.INFRASTRUCTURE_ERROR


# -- policy files with stages and status ------------------------------------------------------

STAGED = """
name = "staged"
version = 2

[[rules]]
id = "abnormal-start"
action = "fail"
stages = ["starting"]
values = { operator = "NotIn", values = [0] }
status = "FINISHED:ABNORMAL"

[[rules]]
action = "stop"
status = "FINISHED:ABANDONED"
codes = ["EXECUTION_ERROR"]
"""


def test_a_policy_file_with_stages_and_status() -> None:
    policy = parse_policy(STAGED)
    starting = decide(exit_event(Code.EXECUTION_ERROR, 1, Stage.STARTING), policy)
    assert (starting.policy.rule, starting.target_status) == ("abnormal-start", ABN)
    later = decide(exit_event(Code.EXECUTION_ERROR, 1, Stage.STARTED), policy)
    assert (later.action, later.policy.rule, later.target_status) == (
        Action.STOP,
        "rules[2]",
        S.FINISHED_ABANDONED,
    )
    # An exit without a stage never matches a stages rule.
    assert decide(exit_event(Code.CONFIG_ERROR, 1), policy).policy.rule == "default"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ('action = "ignore"\nstatus = "FINISHED:ABNORMAL"', "rules[1]: status: an ignore rule"),
        (
            'action = "fail"\nstatus = "FINISHED:COMPLETED"',
            "rules[1]: status: 'FINISHED:COMPLETED'",
        ),
        ('action = "fail"\nstatus = "RUNNING"', "rules[1]: status: 'RUNNING' is not one of"),
        ('action = "fail"\nstages = ["running"]', "rules[1]: stages: 'running' is not one of"),
        ('action = "fail"\nstages = []', "rules[1]: stages: must be a non-empty array"),
    ],
)
def test_a_bad_stage_or_status_is_refused_at_start(rule: str, problem: str) -> None:
    text = f'name = "p"\nversion = "1"\n[[rules]]\n{rule}\n'
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.toml")
    assert str(caught.value).startswith(f"p.toml: {problem}")


def test_a_rule_status_travels_in_the_transition_and_is_applied() -> None:
    event = exit_event(Code.INFRASTRUCTURE_ERROR, 104, Stage.STARTING)
    transition = to_transition(event, decide(event, NV29))
    again = parse_body(transition.to_json())
    assert again == transition and transition.target_status is ABN
    job, _ = apply(Job("job-1", S.RUNNING), transition, T0)
    assert job.status is ABN


# -- the classifier's body is to_transition's model, written directly -------------------------

REASONS = st.none() | st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=60
)
OFFSETS = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    code=st.none() | st.sampled_from(list(Code)),
    value=st.none() | st.integers(-(2**31), 2**31 - 1),
    reason=REASONS,
    launcher=st.none() | st.sampled_from(list(Launcher)),
    stage=st.sampled_from(STAGES),
    when=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
    tz=OFFSETS,
    policy=st.sampled_from(sorted(BUILTINS)),
)
def test_transition_body_parses_to_exactly_to_transitions_model(
    code: Code | None,
    value: int | None,
    reason: str | None,
    launcher: Launcher | None,
    stage: Stage | None,
    when: datetime,
    tz: timezone,
    policy: str,
) -> None:
    if code is None and value is None:
        value = 1
    event = ExitEvent(
        event_id=uuid.uuid4(),
        job_id="job-1",
        site="site-1",
        code=code,
        return_code=value,
        reason=reason,
        launcher=launcher,
        stage=stage,
        occurred_at=when.replace(tzinfo=tz),
    )
    decision = decide(event, BUILTINS[policy])
    if decision.action is Action.IGNORE:
        return
    assert parse_body(transition_body(event, decision)) == to_transition(event, decision)
