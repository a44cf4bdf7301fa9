"""The wire contract (DESIGN 3): the three messages, every limit, and the exported JSON Schema."""

from __future__ import annotations

import json
import string
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exitpipe.export_schemas import JSON_DIR, render
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import (
    EXIT_SCHEMA,
    LIFECYCLE_SCHEMA,
    MAX_BODY_BYTES,
    TRANSITION_SCHEMA,
    BadMessage,
    ExitEvent,
    LifecycleEvent,
    Transition,
    json_schemas,
    parse_body,
    parse_object,
)

EVENT_ID = "9f4d7f16-8f56-4efa-b214-5f6bf4bedcaa"
WHEN = "2026-01-31T12:00:00Z"
IDENTIFIER_CHARS = string.ascii_letters + string.digits + "._-:"
DELETE = object()  # a mutation that removes the field


def exit_dict(**changes: Any) -> dict[str, Any]:
    """A valid exit event as decoded JSON, with ``changes`` applied."""
    base = {
        "schema": EXIT_SCHEMA,
        "event_id": EVENT_ID,
        "job_id": "job-1",
        "site": "site-1",
        "code": "EXECUTION_ERROR",
        "return_code": 137,
        "occurred_at": WHEN,
    }
    return _changed(base, changes)


def lifecycle_dict(**changes: Any) -> dict[str, Any]:
    """A valid lifecycle event as decoded JSON, with ``changes`` applied."""
    base = {
        "schema": LIFECYCLE_SCHEMA,
        "event_id": EVENT_ID,
        "job_id": "job-1",
        "status": "RUNNING",
        "sites": ["site-1", "site-2"],
        "occurred_at": WHEN,
    }
    return _changed(base, changes)


def transition_dict(**changes: Any) -> dict[str, Any]:
    """A valid transition as decoded JSON, with ``changes`` applied."""
    base = {
        "schema": TRANSITION_SCHEMA,
        "event_id": EVENT_ID,
        "job_id": "job-1",
        "action": "fail",
        "target_status": "FINISHED:EXECUTION_EXCEPTION",
        "cause": {"site": "site-1", "code": "EXCEPTION", "occurred_at": WHEN},
        "policy": {"name": "nvflare-2.8", "version": "1", "rule": "fail-on-exception"},
    }
    return _changed(base, changes)


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = {**base, **changes}
    return {key: value for key, value in result.items() if value is not DELETE}


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def refused(raw: bytes) -> str:
    """The reason ``parse_body`` refuses ``raw`` with."""
    with pytest.raises(BadMessage) as caught:
        parse_body(raw)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# -- valid messages round-trip ----------------------------------------------------------------

VALID = [
    pytest.param(exit_dict(), ExitEvent, id="exit-code-and-value"),
    pytest.param(exit_dict(return_code=DELETE), ExitEvent, id="exit-code-only"),
    pytest.param(exit_dict(code=DELETE), ExitEvent, id="exit-value-only"),
    pytest.param(exit_dict(code=None, return_code=-9), ExitEvent, id="exit-null-code"),
    pytest.param(
        exit_dict(launcher="k8s", reason="OOMKilled: container used 2Gi", site="a.b_c-d:e"),
        ExitEvent,
        id="exit-all-fields",
    ),
    pytest.param(exit_dict(occurred_at="2026-01-31T12:00:00.5+05:30"), ExitEvent, id="exit-offset"),
    pytest.param(lifecycle_dict(), LifecycleEvent, id="lifecycle"),
    pytest.param(lifecycle_dict(sites=DELETE), LifecycleEvent, id="lifecycle-no-sites"),
    pytest.param(lifecycle_dict(sites=[]), LifecycleEvent, id="lifecycle-empty-sites"),
    *[
        pytest.param(lifecycle_dict(status=s.value), LifecycleEvent, id=f"lifecycle-{s.value}")
        for s in JobStatus
    ],
    pytest.param(transition_dict(), Transition, id="transition-fail"),
    pytest.param(
        transition_dict(
            action="stop",
            target_status="FINISHED:ABORTED",
            cause={
                "site": "site-2",
                "code": "ABORTED",
                "return_code": -9,
                "reason": "killed",
                "launcher": "docker",
                "occurred_at": WHEN,
            },
        ),
        Transition,
        id="transition-stop",
    ),
]


@pytest.mark.parametrize(("obj", "model"), VALID)
def test_a_valid_message_round_trips(obj: dict[str, Any], model: type) -> None:
    event = parse_body(body(obj))
    assert type(event) is model
    wire = event.to_json()
    assert parse_body(wire) == event
    assert json.loads(wire)["schema"] == obj["schema"]
    assert None not in json.loads(wire).values()  # absent optionals are left out


def test_the_wire_form_keeps_names_and_values() -> None:
    event = parse_body(body(exit_dict(launcher="k8s")))
    assert json.loads(event.to_json()) == exit_dict(launcher="k8s")


def test_accept_restricts_the_schemas() -> None:
    only_exits = frozenset({EXIT_SCHEMA})
    assert isinstance(parse_body(body(exit_dict()), only_exits), ExitEvent)
    with pytest.raises(BadMessage, match=r"^schema: unknown or unexpected"):
        parse_body(body(lifecycle_dict()), only_exits)
    with pytest.raises(BadMessage, match=r"^schema: unknown or unexpected"):
        parse_object(transition_dict(), only_exits)


# -- limits and bad input, each naming its field ----------------------------------------------

LONG = "a" * 129
BAD_FIELDS = [
    # identifiers: 1 to 128 of letters, digits, . _ - :
    *[(exit_dict(job_id=v), "job_id:") for v in ["", LONG, "a b", "a/b", "é", "a\n", 5, None]],
    *[(exit_dict(site=v), "site:") for v in ["", LONG, "site 1", "site#1", "sïte", ["s"]]],
    (lifecycle_dict(job_id="a*"), "job_id:"),
    (lifecycle_dict(sites=["ok", "not ok"]), "sites.1:"),
    (transition_dict(job_id=LONG), "job_id:"),
    (
        transition_dict(cause={"site": "x y", "code": "EXCEPTION", "occurred_at": WHEN}),
        "cause.site:",
    ),
    # sizes
    (exit_dict(reason="r" * 4097), "reason:"),
    (lifecycle_dict(sites=[f"s{n}" for n in range(1001)]), "sites:"),
    # missing and unknown fields
    *[(exit_dict(**{f: DELETE}), f"{f}: missing") for f in ["event_id", "job_id", "site"]],
    (exit_dict(occurred_at=DELETE), "occurred_at: missing"),
    (lifecycle_dict(status=DELETE), "status: missing"),
    (transition_dict(policy=DELETE), "policy: missing"),
    (transition_dict(cause={"site": "s", "occurred_at": WHEN}), "cause.code: missing"),
    (exit_dict(exit_status=1), "exit_status: unknown field"),
    (lifecycle_dict(colour="red"), "colour: unknown field"),
    (transition_dict(policy={"name": "p", "version": "1", "rule": "r", "x": 1}), "policy.x:"),
    # types
    *[(exit_dict(return_code=v), "return_code:") for v in ["1", True, 1.5, 2**31, -(2**31) - 1]],
    *[(exit_dict(code=v), "code:") for v in ["OOM", "exception", 1, True]],
    (exit_dict(launcher="K8S"), "launcher:"),
    (exit_dict(reason=5), "reason:"),
    (lifecycle_dict(status="DONE"), "status:"),
    (lifecycle_dict(status="finished:completed"), "status:"),
    (lifecycle_dict(sites="site-1"), "sites:"),
    # times: RFC 3339 with an offset
    *[
        (exit_dict(occurred_at=v), "occurred_at:")
        for v in [
            "2026-01-31T12:00:00",
            "2026-01-31",
            "2026-01-31T12:00Z",
            "31/01/2026 12:00:00Z",
            "2026-01-31T12:00:00+0100",
            "2026-01-31T12:00:00 UTC",
            "2026-13-31T12:00:00Z",
            "2026-02-30T12:00:00Z",
            1769860800,
            "",
        ]
    ],
    (lifecycle_dict(occurred_at="2026-01-31T12:00:00"), "occurred_at:"),
    # ids
    *[(exit_dict(event_id=v), "event_id:") for v in ["not-a-uuid", "", "1234", 5]],
    # code or return_code
    (exit_dict(code=DELETE, return_code=DELETE), "code: one of code and return_code"),
    (exit_dict(code=None, return_code=None), "code: one of code and return_code"),
    # transitions
    (transition_dict(action="ignore", target_status="FINISHED:COMPLETED"), "action: must be"),
    (transition_dict(action="explode"), "action:"),
    (transition_dict(target_status="RUNNING"), "target_status: must be a FINISHED:* status"),
    (transition_dict(target_status="FINISHED:COMPLETED"), "target_status: must be a FINISHED:*"),
    (transition_dict(policy={"name": "", "version": "1", "rule": "r"}), "policy.name:"),
]


@pytest.mark.parametrize(("obj", "field"), BAD_FIELDS)
def test_bad_input_is_refused_naming_the_field(obj: dict[str, Any], field: str) -> None:
    assert refused(body(obj)).startswith(field)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "body: not UTF-8"),
        (b'{"job_id": "caf\xe9"}', "body: not UTF-8"),
        (b"{", "body: not JSON"),
        (b"", "body: not JSON"),
        (b'{"schema": "exitpipe.exit/1",}', "body: not JSON"),
        (b"[]", "body: not a JSON object"),
        (b'"exitpipe.exit/1"', "body: not a JSON object"),
        (b"1", "body: not a JSON object"),
        (b"null", "body: not a JSON object"),
        (b"[" * 30000 + b"]" * 30000, "body: not JSON (nested too deeply"),
        (b'{"schema": "exitpipe.exit/1", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", "body:"),
        (b"{}", "schema: missing"),
        (body(exit_dict(schema="exitpipe.exit/3")), "schema: unknown or unexpected"),
        (body(exit_dict(schema=1)), "schema: unknown or unexpected"),
        (body(exit_dict(schema=["exitpipe.exit/1"])), "schema: unknown or unexpected"),
    ],
)
def test_unreadable_bodies_are_refused(raw: bytes, reason: str) -> None:
    assert refused(raw).startswith(reason)


def _padded(obj: dict[str, Any], size: int) -> bytes:
    """``obj`` as JSON padded with whitespace to exactly ``size`` bytes."""
    raw = body(obj)
    return raw + b" " * (size - len(raw))


def test_a_body_over_64_kib_is_refused() -> None:
    assert MAX_BODY_BYTES == 64 * 1024
    assert isinstance(parse_body(_padded(exit_dict(), MAX_BODY_BYTES)), ExitEvent)
    reason = refused(_padded(exit_dict(), MAX_BODY_BYTES + 1))
    assert reason.startswith("body: 65537 bytes, over the limit of 65536")


@pytest.mark.parametrize(
    "obj",
    [
        exit_dict(job_id="j" * 128, site="s" * 128),
        exit_dict(reason="r" * 4096),
        exit_dict(reason=""),
        lifecycle_dict(sites=[f"s{n}" for n in range(1000)]),
        exit_dict(return_code=2**31 - 1),
        exit_dict(return_code=-(2**31)),
        exit_dict(occurred_at="2026-01-31T12:00:00.123456-08:00"),
        exit_dict(occurred_at="2026-01-31t12:00:00z"),
    ],
    ids=[
        "ids-128",
        "reason-4096",
        "reason-empty",
        "sites-1000",
        "int-max",
        "int-min",
        "usec",
        "lc",
    ],
)
def test_values_at_a_limit_are_accepted(obj: dict[str, Any]) -> None:
    assert parse_body(body(obj)).to_json()


def test_a_lone_surrogate_is_refused_not_carried_on() -> None:
    # JSON can escape half a UTF-16 pair; such a string could never be re-published.
    raw = body(exit_dict(reason="x")).replace(b'"x"', b'"\\ud800"')
    assert refused(raw).startswith("body: not JSON")


@pytest.mark.parametrize("field", ["reason"])
def test_a_nul_character_is_refused_for_both_stores(field: str) -> None:
    # PostgreSQL cannot hold NUL in text; SQLite could, and the two stores must agree.
    assert refused(body(exit_dict(**{field: "a\u0000b"}))).startswith(f"{field}: contains a NUL")


def test_several_problems_are_all_named() -> None:
    reason = refused(body(exit_dict(job_id="a b", site="", extra=1)))
    assert "job_id:" in reason and "site:" in reason and "extra:" in reason


# -- effective code and launcher --------------------------------------------------------------


@pytest.mark.parametrize("code", list(Code))
def test_a_known_integer_means_its_code(code: Code) -> None:
    assert parse_body(body(exit_dict(code=DELETE, return_code=int(code)))).effective_code is code


@pytest.mark.parametrize("value", [2, 100, 105, 126, 128, 137, 255, -1, -9, -15, 2**31 - 1])
def test_an_integer_outside_the_table_is_unknown(value: int) -> None:
    event = parse_body(body(exit_dict(code=DELETE, return_code=value)))
    assert event.effective_code is Code.UNKNOWN
    assert event.return_code == value  # the raw value is kept


def test_the_name_given_wins_over_the_value() -> None:
    event = parse_body(body(exit_dict(code="EXECUTION_ERROR", return_code=137)))
    assert (event.effective_code, event.return_code) == (Code.EXECUTION_ERROR, 137)


def test_the_launcher_defaults_to_process() -> None:
    assert parse_body(body(exit_dict())).effective_launcher is Launcher.PROCESS
    k8s = parse_body(body(exit_dict(launcher="k8s")))
    assert k8s.effective_launcher is Launcher.K8S


# -- properties -------------------------------------------------------------------------------

IDENTIFIERS = st.text(alphabet=IDENTIFIER_CHARS, min_size=1, max_size=128)
FORBIDDEN = st.characters(exclude_categories=("Cs",)).filter(lambda c: c not in IDENTIFIER_CHARS)


@given(job_id=IDENTIFIERS, site=IDENTIFIERS)
def test_any_valid_identifier_round_trips(job_id: str, site: str) -> None:
    event = parse_body(body(exit_dict(job_id=job_id, site=site)))
    assert (event.job_id, event.site) == (job_id, site)
    assert parse_body(event.to_json()) == event


@given(
    before=st.text(IDENTIFIER_CHARS, max_size=60),
    bad=FORBIDDEN,
    after=st.text(IDENTIFIER_CHARS, max_size=60),
    field=st.sampled_from(["job_id", "site"]),
)
def test_any_identifier_with_a_forbidden_char_is_refused(
    before: str, bad: str, after: str, field: str
) -> None:
    assert refused(body(exit_dict(**{field: before + bad + after}))).startswith(f"{field}:")


@given(st.text(IDENTIFIER_CHARS, min_size=129, max_size=400))
def test_any_identifier_over_128_characters_is_refused(job_id: str) -> None:
    assert refused(body(exit_dict(job_id=job_id))).startswith("job_id:")


@given(st.integers(-(2**31), 2**31 - 1))
def test_any_int32_return_code_round_trips(value: int) -> None:
    event = parse_body(body(exit_dict(return_code=value)))
    assert parse_body(event.to_json()).return_code == value


@given(st.integers().filter(lambda v: not -(2**31) <= v < 2**31))
def test_any_return_code_outside_int32_is_refused(value: int) -> None:
    assert refused(body(exit_dict(return_code=value))).startswith("return_code:")


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=300))
def test_any_reason_round_trips(reason: str) -> None:
    event = parse_body(body(exit_dict(reason=reason)))
    assert parse_body(event.to_json()).reason == reason


OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    when=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
    tz=OFFSETS,
)
def test_any_aware_time_round_trips(when: datetime, tz: timezone) -> None:
    aware = when.replace(tzinfo=tz)
    event = parse_body(body(exit_dict(occurred_at=aware.isoformat())))
    assert event.occurred_at == aware
    assert parse_body(event.to_json()).occurred_at == aware


@given(st.uuids())
def test_any_uuid_round_trips(event_id: uuid.UUID) -> None:
    event = parse_body(body(exit_dict(event_id=str(event_id))))
    assert event.event_id == event_id
    assert json.loads(event.to_json())["event_id"] == str(event_id)


# -- the exported JSON Schema cannot drift from the models ------------------------------------


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_exported_schema_matches_the_model(name: str) -> None:
    exported = (JSON_DIR / name).read_text(encoding="utf-8")
    assert exported == render(json_schemas()[name]), "run: python -m exitpipe.export_schemas"


def test_no_stray_schema_files() -> None:
    assert {p.name for p in JSON_DIR.iterdir()} == set(json_schemas())


def test_the_schemas_describe_the_limits() -> None:
    schemas = json_schemas()
    exit_schema = schemas["exit.schema.json"]
    assert exit_schema["additionalProperties"] is False
    assert exit_schema["properties"]["job_id"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    assert {"event_id", "job_id", "site", "occurred_at"} <= set(exit_schema["required"])
    lifecycle = schemas["lifecycle.schema.json"]["properties"]["sites"]["anyOf"][0]
    assert lifecycle["maxItems"] == 1000
