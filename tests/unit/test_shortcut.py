"""The shortcut for well-formed bodies (schemas.events.well_formed) is only faster, never different.

Whatever it builds must be the very event pydantic's validation builds from the same input, and
whatever it does not take still gets the full path's event or reason. Producers' own bodies must
take it, or the speed it exists for is gone.
"""

from __future__ import annotations

import string
import uuid
from datetime import UTC, datetime
from typing import Any

import jiter
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas.events as events_module
from consumers import replay
from consumers.policy import decide, load_policy, transition_body
from schemas.codes import Code, JobStatus, Launcher, Stage
from schemas.events import (
    EXIT_SCHEMA,
    EXIT_SCHEMA_V1,
    LIFECYCLE_SCHEMA,
    MAX_REASON_CHARS,
    TRANSITION_SCHEMA,
    BadMessage,
    Event,
    ExitEvent,
    LifecycleEvent,
    Transition,
    canonical_json,
    parse_body,
    parse_object,
    read_json,
    well_formed,
)
from schemas.topology import Names

IDENT = string.ascii_letters + string.digits + "._-:"

identifiers = st.one_of(
    st.text(IDENT, min_size=1, max_size=8),
    st.tuples(st.sampled_from(IDENT), st.integers(126, 130)).map(lambda t: t[0] * t[1]),
    st.text(IDENT + " /é\x00", max_size=6),
    st.integers(),
    st.none(),
    st.lists(st.text(IDENT, min_size=1, max_size=3), max_size=2),
)
event_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.text(max_size=40),
    st.integers(),
    st.none(),
)
times = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.datetimes().map(lambda d: d.isoformat()),  # no offset
    st.datetimes().map(lambda d: d.isoformat() + "+01:00"),
    st.datetimes().map(lambda d: d.isoformat() + "-23:59"),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%dt%H:%M:%S.%fz")),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S") + "+00:00"),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.123456789Z")),
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "2026-02-30T00:00:00Z",
            "2026-01-31T24:00:00Z",
            "9999-12-31T23:59:59-01:00",
        ]
    ),
    st.text(max_size=30),
    st.integers(),
    st.none(),
)


def _names(enum: Any, *others: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(list(enum)), st.sampled_from(list(others)))


codes = _names([c.name for c in Code], "success", "NOPE", 101, None, ["EXCEPTION"])
return_codes = st.one_of(
    st.integers(min_value=-(2**31) - 2, max_value=2**31 + 2),
    st.sampled_from([2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**64, True, False, 1.0, "1", None]),
)
launchers = _names([m.value for m in Launcher], "PROCESS", "", None, 1)
stages = _names([m.value for m in Stage], "STARTED", "stopped", None, {})
statuses = _names([m.value for m in JobStatus], "running", "FINISHED:", None, 3)
reasons = st.one_of(
    st.text(max_size=20),
    st.text(max_size=3).map(lambda t: t + "\x00"),
    st.just("\ud800"),
    st.just("x" * MAX_REASON_CHARS),
    st.just("x" * (MAX_REASON_CHARS + 1)),
    st.integers(),
    st.none(),
)
site_lists = st.one_of(
    st.lists(identifiers, max_size=4),
    st.just(["s"] * 1000),
    st.just(["s"] * 1001),
    st.text(max_size=4),
    st.none(),
)
schemas = st.sampled_from(
    [EXIT_SCHEMA, EXIT_SCHEMA_V1, LIFECYCLE_SCHEMA, TRANSITION_SCHEMA, "exitpipe.exit/3", None]
)

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": event_ids,
    "job_id": identifiers,
    "site": identifiers,
    "launcher": launchers,
    "code": codes,
    "return_code": return_codes,
    "reason": reasons,
    "stage": stages,
    "occurred_at": times,
    "status": statuses,
    "sites": site_lists,
    "extra": st.integers(),
}


VALID_EXIT = st.fixed_dictionaries(
    {
        "schema": st.sampled_from([EXIT_SCHEMA, EXIT_SCHEMA_V1]),
        "event_id": st.uuids().map(str),
        "job_id": st.text(IDENT, min_size=1, max_size=8),
        "site": st.text(IDENT, min_size=1, max_size=8),
        "occurred_at": times.filter(lambda t: isinstance(t, str) and t[:1].isdigit()),
    },
    optional={
        "code": st.sampled_from([c.name for c in Code]),
        "return_code": st.integers(-(2**31), 2**31 - 1),
        "launcher": st.sampled_from([m.value for m in Launcher]),
        "reason": st.text(max_size=10),
        "stage": st.sampled_from([m.value for m in Stage]),
    },
)
VALID_LIFECYCLE = st.fixed_dictionaries(
    {
        "schema": st.just(LIFECYCLE_SCHEMA),
        "event_id": st.uuids().map(str),
        "job_id": st.text(IDENT, min_size=1, max_size=8),
        "status": st.sampled_from([m.value for m in JobStatus]),
        "occurred_at": times.filter(lambda t: isinstance(t, str) and t[:1].isdigit()),
    },
    optional={"sites": st.lists(st.text(IDENT, min_size=1, max_size=4), max_size=3)},
)


labels = st.one_of(
    st.text(min_size=1, max_size=6),
    st.sampled_from(["", "x" * 128, "x" * 129, "a\x00", "\ud800", None, 1]),
)
VALID_CAUSE = st.fixed_dictionaries(
    {
        "site": st.text(IDENT, min_size=1, max_size=8),
        "code": st.sampled_from([c.name for c in Code]),
        "occurred_at": times.filter(lambda t: isinstance(t, str) and t[:1].isdigit()),
    },
    optional={
        "return_code": st.integers(-(2**31), 2**31 - 1),
        "launcher": st.sampled_from([m.value for m in Launcher]),
        "reason": st.text(max_size=10),
    },
)
VALID_TRANSITION = st.fixed_dictionaries(
    {
        "schema": st.just(TRANSITION_SCHEMA),
        "event_id": st.uuids().map(str),
        "job_id": st.text(IDENT, min_size=1, max_size=8),
        "action": st.sampled_from(["fail", "stop"]),
        "target_status": st.sampled_from([m.value for m in JobStatus if m.terminal]),
        "cause": VALID_CAUSE,
        "policy": st.fixed_dictionaries(
            {"name": st.just("nvflare-2.9"), "version": st.just("1"), "rule": st.just("r")}
        ),
    }
)
TRANSITION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "action": st.sampled_from(["fail", "stop", "ignore", "FAIL", None, 1]),
    "target_status": statuses,
    "cause": st.one_of(VALID_CAUSE, st.none(), st.integers()),
    "policy": st.one_of(st.none(), st.just({"name": "n", "version": "1"})),
}
CAUSE_FIELDS = {name: FIELDS[name] for name in ("site", "launcher", "reason", "occurred_at")}
CAUSE_FIELDS |= {"code": codes, "return_code": return_codes, "stage": stages}


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Decoded bodies near the valid ones: a valid body with a few fields changed or removed."""
    body: dict[str, Any] = dict(draw(st.one_of(VALID_EXIT, VALID_LIFECYCLE, VALID_TRANSITION)))
    fields = {**FIELDS, **TRANSITION_FIELDS}
    for _ in range(draw(st.integers(0, 3))):
        where, names = body, fields
        if isinstance(body.get("cause"), dict) and draw(st.booleans()):
            where = body["cause"] = dict(body["cause"])
            names = CAUSE_FIELDS
        elif isinstance(body.get("policy"), dict) and draw(st.integers(0, 3)) == 0:
            where = body["policy"] = dict(body["policy"])
            names = {"name": labels, "version": labels, "rule": labels, "extra": labels}
        name = draw(st.sampled_from(sorted(names) + (["schema"] if where is body else [])))
        if draw(st.integers(0, 4)) == 0:
            where.pop(name, None)
        else:
            where[name] = draw(schemas if name == "schema" else names[name])
    return body


def _same(fast: Event, slow: Event) -> None:
    assert type(fast) is type(slow)
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump() == slow.model_dump()
    assert fast.to_json() == slow.to_json()
    for name, value in slow.__dict__.items():
        assert type(fast.__dict__[name]) is type(value), name
    if isinstance(slow, Transition):
        assert isinstance(fast, Transition)
        for part in ("cause", "policy"):
            fast_part, slow_part = getattr(fast, part), getattr(slow, part)
            assert fast_part.model_fields_set == slow_part.model_fields_set
            for name, value in slow_part.__dict__.items():
                assert type(fast_part.__dict__[name]) is type(value), name
        assert fast.cause.occurred_at.utcoffset() == slow.cause.occurred_at.utcoffset()
    else:
        assert fast.occurred_at.utcoffset() == slow.occurred_at.utcoffset()


def _full(obj: Any) -> Event | str:
    try:
        return parse_object(obj)
    except BadMessage as exc:
        return exc.reason


@settings(max_examples=3000)
@given(bodies())
def test_what_the_shortcut_builds_is_what_validation_builds(body: dict[str, Any]) -> None:
    fast = well_formed(body)
    slow = _full(body)
    if fast is not None:
        assert not isinstance(slow, str), f"the shortcut took a body validation refuses: {slow}"
        _same(fast, slow)


@settings(max_examples=1500)
@given(bodies())
def test_a_body_reads_the_same_through_parse_body_as_through_the_full_path(
    body: dict[str, Any],
) -> None:
    try:
        text = orjson.dumps(body)
    except TypeError:
        return
    try:
        slow: Event | str = parse_object(read_json(text))
    except BadMessage as exc:
        slow = exc.reason
    try:
        fast: Event | str = parse_body(text)
    except BadMessage as exc:
        fast = exc.reason
    if isinstance(slow, str):
        assert fast == slow
    else:
        assert not isinstance(fast, str)
        _same(fast, slow)


@given(st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_canonical_json_reads_only_what_the_full_reader_reads_the_same(text: bytes) -> None:
    obj = canonical_json(text)
    if obj is not None:
        try:
            full = jiter.from_json(text, allow_inf_nan=False, catch_duplicate_keys=True)
        except ValueError:  # nested deeper than the full reader allows: never an event
            assert well_formed(obj) is None
        else:
            assert obj == full


def test_a_value_nested_deeper_than_the_full_reader_allows_is_left_to_it() -> None:
    text = b'{"schema":"exitpipe.exit/2","reason":' + b"[" * 220 + b"]" * 220 + b"}"
    assert well_formed(canonical_json(text)) is None
    with pytest.raises(BadMessage, match="nested too deeply"):
        parse_body(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":2}',  # a duplicate key: orjson keeps the last one, jiter refuses
        b'{"a": 1}',  # not compact
        b'{"a":"\\u0062"}',  # an escape
        b'{"a":100000000000000000000}',  # orjson rounds it to a float
        b'{"a":1}\n',  # trailing bytes
        b"[1]",  # not an object
        b'{"a":' * 300 + b"1" + b"}" * 300,  # deeper than orjson encodes
    ],
)
def test_canonical_json_leaves_doubtful_text_to_the_full_reader(text: bytes) -> None:
    assert canonical_json(text) is None


def _exit(**fields: Any) -> ExitEvent:
    base: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "job_id": "job-1",
        "site": "site-1",
        "code": Code.EXCEPTION,
        "return_code": 101,
        "occurred_at": datetime.now(UTC),
    }
    return ExitEvent(**{**base, **fields})


@pytest.mark.parametrize(
    "event",
    [
        _exit(),
        _exit(stage=Stage.STARTING, launcher=Launcher.K8S, reason="Traceback: é"),
        _exit(code=None),
        _exit(return_code=None),
        _exit(schema_=EXIT_SCHEMA_V1),
        LifecycleEvent(
            event_id=uuid.uuid4(),
            job_id="job-1",
            status=JobStatus.SUBMITTED,
            sites=["site-1", "site-2"],
            occurred_at=datetime.now(UTC),
        ),
        LifecycleEvent(
            event_id=uuid.uuid4(),
            job_id="job-1",
            status=JobStatus.FINISHED_ABNORMAL,
            occurred_at=datetime.now(UTC),
        ),
    ],
    ids=["exit", "exit-all-fields", "rc-only", "code-only", "exit-v1", "lifecycle", "terminal"],
)
def test_what_producers_write_takes_the_shortcut(event: Event) -> None:
    body = event.to_json()
    fast = well_formed(canonical_json(body))
    assert fast is not None, "a producer's own body went down the slow path"
    _same(fast, parse_object(read_json(body)))


def _line_results(line: bytes) -> tuple[Event | str, Event | str]:
    """What replay makes of one line with the shortcut, and what the full path makes of it."""
    checks = replay.Checks(Names("ns1"))
    out = []
    for shortcut in (True, False):
        try:
            if shortcut:
                out.append(replay._line_event(line, checks))
            else:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(replay, "_well_formed_line", lambda _line, _checks: None)
                    out.append(replay._line_event(line, checks))
        except BadMessage as exc:
            out.append(exc.reason)
    return out[0], out[1]


envelopes = st.fixed_dictionaries(
    {
        "namespace": st.sampled_from(["ns1", "ns2", "", None, 3]),
        "routing_key": st.sampled_from(["exit.site-1", "exit.s", "lifecycle.RUNNING", "x", None]),
        "body": bodies(),
    },
    optional={
        "sender": st.sampled_from([None, "ns1-site-site-1", "ns1-server", "guest", 7]),
        "extra": st.integers(),
    },
)


@settings(max_examples=1500)
@given(st.one_of(bodies(), envelopes), st.sampled_from([b"", b"\n", b"\r\n", b" \n"]))
def test_replay_reads_a_line_the_same_with_the_shortcut_as_without(
    value: dict[str, Any], end: bytes
) -> None:
    try:
        line = orjson.dumps(value) + end
    except TypeError:
        return
    fast, slow = _line_results(line)
    if isinstance(slow, str):
        assert fast == slow
    else:
        assert not isinstance(fast, str), fast
        _same(fast, slow)


def test_an_exported_line_takes_the_shortcut() -> None:
    event = _exit()
    envelope = {
        "namespace": "ns1",
        "routing_key": "exit.site-1",
        "sender": "ns1-site-site-1",
        "body": orjson.loads(event.to_json()),
    }
    checks = replay.Checks(Names("ns1"))
    assert replay._well_formed_line(orjson.dumps(envelope) + b"\n", checks) == event
    assert replay._well_formed_line(event.to_json() + b"\n", checks) == event


@pytest.mark.parametrize("reason", [None, "Traceback: é"])
def test_what_the_classifier_forwards_takes_the_shortcut(reason: str | None) -> None:
    event = _exit(reason=reason, launcher=Launcher.DOCKER)
    policy = load_policy("nvflare-2.9")
    body = transition_body(event, decide(event, policy))
    fast = well_formed(canonical_json(body))
    assert fast is not None, "the job-state consumer's input went down the slow path"
    _same(fast, parse_object(read_json(body)))


def test_the_identifiers_it_remembers_stay_few_however_many_jobs_it_sees() -> None:
    # A daemon lives long and sees ever new job ids: its memory must not grow with them.
    for n in range(3 * events_module._KNOWN_LIMIT):
        assert well_formed(orjson.loads(_exit(job_id=f"job-{n}").to_json())) is not None
    assert len(events_module._known_identifiers) <= events_module._KNOWN_LIMIT


def test_an_envelope_without_a_sender_is_replayed_as_one_with_none() -> None:
    event = _exit()
    line = orjson.dumps(
        {"namespace": "ns1", "routing_key": "exit.site-1", "body": orjson.loads(event.to_json())}
    )
    assert list(replay.parse_lines([line], replay.Checks(Names("ns1")))) == [event]
