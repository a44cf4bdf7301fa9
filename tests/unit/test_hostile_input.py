"""Hostile and careless input (issue 11): the wire parser, the sender rules and replay's readers.

Every defect the issue reproduced has a case here that failed before its fix: the 5,000-digit
integer that escaped the parser as a plain ValueError, the duplicate ``site`` key, a site
reporting as another under its own routing key, a transition sent with a lifecycle key, text
PostgreSQL cannot hold, and a replay that applied what the live classifier refused. The
properties say the general law: any bytes, any JSON value, any nesting give an event or a
bad-input reason, never another exception.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.amqp import DeadLetter, Delivery, Forward
from consumers.classifier import ClassifierHandler
from consumers.dead_letters import dead_message, route_back
from consumers.policy import BUILTINS
from consumers.replay import Checks, Unreadable, parse_archived, parse_lines
from consumers.senders import dead_letter_sender, exit_problem, job_event_problem, sender_of
from schemas.events import BadMessage, Event, ExitEvent, parse_body
from schemas.topology import SENDER_HEADER, Names
from tests.strategies import transition
from tests.unit.test_schemas import exit_dict, lifecycle_dict

NAMES = Names("ns")
SITE_A, SITE_B = NAMES.site_user("site-a"), NAMES.site_user("site-b")


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def reason(raw: bytes) -> str:
    with pytest.raises(BadMessage) as caught:
        parse_body(raw)
    return caught.value.reason


def exit_of(site: str = "site-a") -> ExitEvent:
    event = parse_body(body(exit_dict(site=site, code="EXCEPTION", return_code=101)))
    assert isinstance(event, ExitEvent)
    return event


# -- the parser: every kind of unparseable input is bad input, with a reason -------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # json.loads raises a plain ValueError past 4,300 digits: it used to escape parse_body.
        (body(exit_dict()).replace(b"137", b"9" * 5000), "body: not JSON (a number too large"),
        (body(exit_dict()).replace(b"137", b"1e400"), "return_code: Input should be a valid int"),
        (body(exit_dict()).replace(b"137", b"NaN"), "body: not JSON"),
        (body(exit_dict()).replace(b"137", b"-Infinity"), "body: not JSON"),
        (b"\xef\xbb\xbf" + body(exit_dict()), "body: starts with a byte-order mark"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "body: not JSON (nested too deeply"),
        (body(exit_dict()) + b" {}", "body: not JSON (trailing characters"),
        (body(exit_dict()).replace(b'"site-1"', b'"site\xc3"'), "body: not UTF-8"),
        (body(exit_dict(reason="a\x00b")), "reason: contains a NUL character"),
    ],
)
def test_unparseable_input_is_bad_input_with_a_reason(raw: bytes, expected: str) -> None:
    assert reason(raw).startswith(expected)


def test_a_key_given_twice_is_refused_not_resolved() -> None:
    # The second "site" used to win silently, so a body could name two sites at once.
    raw = body(exit_dict(site="site-a"))[:-1] + b', "site": "site-b"}'
    assert "duplicate key" in reason(raw)


def test_a_transition_whose_policy_text_the_store_cannot_hold_is_refused() -> None:
    t = json.loads(transition("job-a", "site-1").to_json())
    t["policy"]["name"] = "evil\x00policy"
    assert reason(body(t)).startswith("policy.name: contains a NUL character")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_any_bytes_give_an_event_or_a_reason(raw: bytes) -> None:
    _event_or_reason(raw)


@settings(max_examples=500)
@given(JSON_VALUES)
def test_any_json_value_gives_an_event_or_a_reason(value: Any) -> None:
    _event_or_reason(body(value))


@settings(max_examples=300)
@given(JSON_VALUES, st.sampled_from(sorted(exit_dict())))
def test_any_json_value_in_any_field_gives_an_event_or_a_reason(value: Any, field: str) -> None:
    _event_or_reason(body(exit_dict(**{field: value})))
    _event_or_reason(body(lifecycle_dict(**{field: value})))


@given(st.integers(1, 3000), st.sampled_from([b"[", b'{"a":']))
def test_any_nesting_gives_a_reason(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    _event_or_reason(opener * depth + b"1" + closer * depth)


def _event_or_reason(raw: bytes) -> None:
    try:
        event = parse_body(raw)
    except BadMessage as exc:
        assert exc.reason and ":" in exc.reason  # names the field (or "body") and the problem
    else:
        assert event.event_id is not None


# -- who may say what ------------------------------------------------------------------------


def test_a_site_cannot_report_for_another_site_under_its_own_key() -> None:
    # Issue 11, defect 1: site-a's user, no user_id, body naming site-b.
    problem = exit_problem(NAMES, "exit.site-a", exit_of("site-b"), None, False)
    assert problem is not None and problem.startswith("routing key: 'exit.site-a'")


def test_a_site_user_must_report_as_its_own_site() -> None:
    assert exit_problem(NAMES, "exit.site-b", exit_of("site-b"), SITE_A, False) is not None
    assert exit_problem(NAMES, "exit.site-a", exit_of("site-a"), SITE_A, True) is None


def test_require_site_user_refuses_exits_from_anyone_else() -> None:
    for sender in (None, "guest", NAMES.server_user):
        assert exit_problem(NAMES, "exit.site-a", exit_of(), sender, True) is not None


def test_a_transition_under_a_lifecycle_key_is_refused() -> None:
    # Issue 11, defect 3: the server's user may publish lifecycle.* only.
    event = transition("job-a", "site-a")
    problem = job_event_problem(NAMES, "lifecycle.RUNNING", event, NAMES.server_user)
    assert problem is not None and problem.startswith("routing key:")
    assert job_event_problem(NAMES, "transition.fail", event, NAMES.server_user) is not None
    assert job_event_problem(NAMES, "transition.fail", event, NAMES.classifier_user) is None
    assert job_event_problem(NAMES, "transition.fail", event, None) is None


def test_the_sender_header_is_believed_from_the_operator_only() -> None:
    vouching = {SENDER_HEADER: SITE_B}
    assert sender_of(NAMES, NAMES.operator_user, vouching) == SITE_B  # dead requeue
    assert sender_of(NAMES, NAMES.operator_user, {SENDER_HEADER: ""}) is None
    assert sender_of(NAMES, NAMES.operator_user, None) == NAMES.operator_user
    # Nobody else can vouch: not a site, not the server, not an administrator, not guest.
    for user in (SITE_A, NAMES.server_user, NAMES.classifier_user, "admin", "guest"):
        assert sender_of(NAMES, user, vouching) == user
    assert sender_of(NAMES, None, vouching) is None


def test_a_forged_sender_header_gets_no_exit_past_require_site_user() -> None:
    forged = sender_of(NAMES, "guest", {SENDER_HEADER: SITE_B})
    assert exit_problem(NAMES, "exit.site-b", exit_of("site-b"), forged, True) is not None


def test_a_dead_letter_keeps_its_original_sender() -> None:
    # Written by a daemon (its own user_id, the sender in the header) ...
    by_daemon = dead_letter_sender(NAMES, NAMES.classifier_user, {SENDER_HEADER: SITE_A})
    assert by_daemon == SITE_A
    # ... or by the broker's delivery limit (the original user_id, a forged header ignored).
    death = {"x-death": [{"count": 5, "reason": "delivery_limit"}]}
    assert dead_letter_sender(NAMES, SITE_A, {SENDER_HEADER: SITE_B, **death}) == SITE_A
    assert dead_letter_sender(NAMES, None, {SENDER_HEADER: SITE_B, **death}) is None


def test_a_dead_letter_of_the_broker_is_read_from_x_death_not_from_forged_headers() -> None:
    headers = {
        "x-death": [{"count": 5, "reason": "delivery_limit", "queue": NAMES.classify}],
        "x-exitpipe-error": "forged reason",
        "x-exitpipe-source": NAMES.job_state,
    }
    props = SimpleNamespace(headers=headers, message_id="m", user_id=SITE_A)
    message = dead_message(NAMES, 1, "exit.site-a", props, b"{}")
    assert (message.reason, message.source, message.sender) == (
        "delivery_limit",
        NAMES.classify,
        SITE_A,
    )
    assert route_back(NAMES, message) == (NAMES.events, "exit.site-a")


def _delivery(raw: bytes, key: str, user_id: str | None = None, headers: Any = None) -> Delivery:
    props = SimpleNamespace(user_id=user_id, headers=headers, message_id="m-1")
    return Delivery(1, raw, props, key, False, 1)  # type: ignore[arg-type]


def test_the_classifier_dead_letters_a_spoof_with_its_sender() -> None:
    handler = ClassifierHandler(BUILTINS["nvflare-2.8"], NAMES)
    spoof = _delivery(exit_of("site-b").to_json(), "exit.site-a", SITE_A)
    action = handler.handle(spoof)
    assert isinstance(action, DeadLetter) and action.sender == SITE_A
    good = handler.handle(_delivery(exit_of("site-a").to_json(), "exit.site-a", SITE_A))
    assert isinstance(good, Forward)


# -- replay applies the live checks ----------------------------------------------------------

CHECKS = Checks(NAMES)


def envelope(event: Event, key: str, sender: str | None, ns: str = "ns") -> bytes:
    head = {"namespace": ns, "routing_key": key, "sender": sender}
    return json.dumps({**head, "body": json.loads(event.to_json())}).encode() + b"\n"


def test_replay_refuses_an_exported_spoof_as_the_classifier_did() -> None:
    # Issue 11, defect 7.
    lines = [
        envelope(exit_of("site-b"), "exit.site-a", None),
        envelope(exit_of("site-a"), "exit.site-a", SITE_A),
        exit_of("site-b").to_json() + b"\n",  # a bare body: replayed without the checks
    ]
    items = list(parse_lines(lines, CHECKS))
    assert isinstance(items[0], Unreadable) and items[0].where == "line 1"
    assert items[0].reason.startswith("refused as live: routing key")
    assert isinstance(items[1], ExitEvent) and isinstance(items[2], ExitEvent)


def test_replay_judges_an_envelope_in_its_own_namespace() -> None:
    spoof = envelope(exit_of("site-b"), "exit.site-b", "prod-site-site-a", ns="prod")
    (item,) = parse_lines([spoof], CHECKS)
    assert isinstance(item, Unreadable) and "authenticated as site 'site-a'" in item.reason


def test_replay_from_the_archive_refuses_what_the_classifier_refused() -> None:
    spoof = SimpleNamespace(
        offset=3, routing_key="exit.site-a", body=exit_of("site-b").to_json(), user_id=SITE_A
    )
    spoof.headers = None
    (item,) = parse_archived([spoof], CHECKS)
    assert isinstance(item, Unreadable) and item.where == "offset 3"
    assert item.reason.startswith("refused as live: site: event names 'site-b'")


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200) | JSON_VALUES.map(body), max_size=8))
def test_replay_reads_any_lines_into_events_or_reasons(raw: list[bytes]) -> None:
    lines = [line.replace(b"\n", b" ") + b"\n" for line in raw]
    for item in parse_lines(lines, CHECKS):
        assert isinstance(item, Unreadable) or item.event_id is not None


@settings(max_examples=300)
@given(JSON_VALUES, JSON_VALUES, JSON_VALUES)
def test_replay_reads_any_envelope_into_an_event_or_a_reason(
    key: Any, sender: Any, inner: Any
) -> None:
    raw = {"namespace": "ns", "routing_key": key, "sender": sender, "body": inner}
    for item in parse_lines([body(raw) + b"\n"], CHECKS):
        assert isinstance(item, Unreadable) or item.event_id is not None


def test_a_role_user_that_is_not_a_site_may_not_report_exits() -> None:
    for sender in (NAMES.server_user, NAMES.classifier_user, NAMES.job_state_user):
        problem = exit_problem(NAMES, "exit.site-a", exit_of(), sender, False)
        assert problem == f"site: {sender!r} is not a site and may not report exits"


def test_only_the_server_may_publish_a_lifecycle_event() -> None:
    event = parse_body(body(lifecycle_dict(status="RUNNING")))
    assert job_event_problem(NAMES, "lifecycle.RUNNING", event, NAMES.server_user) is None
    assert job_event_problem(NAMES, "lifecycle.RUNNING", event, "admin") is None
    for sender in (SITE_A, NAMES.classifier_user):
        problem = job_event_problem(NAMES, "lifecycle.RUNNING", event, sender)
        assert problem == f"sender: {sender!r} may not publish a lifecycle event"


def test_replay_of_a_file_reports_unreadable_lines_and_carries_on(tmp_path: Any) -> None:
    import subprocess
    import sys

    good = exit_of("site-a").to_json()
    lines = [
        good,
        good.replace(b'"return_code":101', b'"return_code":' + b"9" * 5000),  # was a traceback
        b"{not json",
        *(b'{"schema": "x%d"}' % n for n in range(12)),
        envelope(exit_of("site-b"), "exit.site-a", SITE_A).rstrip(),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    env = {"PATH": "/usr/bin:/bin", "EXITPIPE_NAMESPACE": "ns", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", "replay", "--file", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr  # 1 would mean "policies differ"
    out = json.loads(done.stdout)
    assert out["events"] == 1
    unreadable = out["unreadable"]
    assert [u["where"] for u in unreadable] == [f"line {n}" for n in range(2, 17)]
    assert "a number too large" in unreadable[0]["reason"]
    assert unreadable[-1]["reason"].startswith("refused as live: site:")
    named = [line for line in done.stderr.splitlines() if line.endswith("(skipped)")]
    assert len(named) == 10  # the first reasons, then only a count
    assert "15 unreadable or refused input(s) skipped" in done.stderr


# -- raw JSON text: what json.dumps never writes ---------------------------------------------

RAW_SCALARS = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),  # past 4,300 digits json.loads raises
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1.5", "true", "null"]),
    st.text(max_size=20).map(lambda t: json.dumps(t)),
    st.sampled_from(['"\\ud800"', '"\\u0000"', '"a\\"b"']),
    st.builds(
        lambda year, minutes, sign: json.dumps(
            f"{year:04d}-12-31T23:59:59{sign}{minutes // 60:02d}:{minutes % 60:02d}"
        ),
        st.sampled_from([1, 2, 1970, 9998, 9999]),
        st.integers(0, 23 * 60 + 59),
        st.sampled_from(["+", "-"]),
    ),
)
RAW_KEYS = st.sampled_from(
    ["schema", "event_id", "job_id", "site", "\\u0073ite", "code", "return_code",
     "occurred_at", "stage", "reason", "x"]
)  # fmt: skip


@st.composite
def raw_exit(draw: st.DrawFn) -> bytes:
    """An exit event's JSON text with raw members added or repeated, keys escaped."""
    members = [
        f'"{k}": {json.dumps(v)}'
        for k, v in exit_dict().items()
        if not (k == "schema" and draw(st.booleans()))
    ]
    extra = draw(st.lists(st.tuples(RAW_KEYS, RAW_SCALARS), max_size=4))
    members += [f'"{k}": {v}' for k, v in extra]
    order = draw(st.permutations(members))
    return ("{" + ", ".join(order) + "}").encode()


@settings(max_examples=500)
@given(raw_exit())
def test_any_raw_json_text_gives_an_event_or_a_reason(raw: bytes) -> None:
    _event_or_reason(raw)


@given(raw_exit(), st.sampled_from([b"", b" ", b"\n", b"\xef\xbb\xbf", b"[", b"}"]))
def test_raw_text_with_stray_bytes_gives_an_event_or_a_reason(raw: bytes, stray: bytes) -> None:
    _event_or_reason(stray + raw)
    _event_or_reason(raw + stray)


@settings(max_examples=300)
@given(st.lists(raw_exit(), max_size=6))
def test_replay_reads_any_raw_lines_into_events_or_reasons(raw: list[bytes]) -> None:
    for item in parse_lines([line + b"\n" for line in raw], CHECKS):
        assert isinstance(item, Unreadable) or item.event_id is not None


def test_replay_refuses_a_body_over_the_limit_as_the_live_consumers_do() -> None:
    padded = body(exit_dict()).replace(b", ", b"," + b" " * 11_000)  # legal JSON, too long
    assert 64 * 1024 < len(padded) < 64 * 1024 + 2048  # within a line's room for an envelope
    (item,) = parse_lines([padded + b"\n"], CHECKS)
    assert isinstance(item, Unreadable) and item.reason.startswith("body: ")
    assert "over the limit" in item.reason


class _PoisonedStore:
    """A memory store on which one event raises a bug (not a StoreError) in any batch."""

    def __init__(self, poison: str) -> None:
        from consumers.store.memory import MemoryStore

        self.inner = MemoryStore()
        self.poison = poison

    def apply_batch(self, events: Any) -> Any:
        if any(str(e.event_id) == self.poison for e in events):
            raise RuntimeError("a bug on this event")
        return self.inner.apply_batch(events)


def test_a_batch_that_raises_is_retried_one_by_one_and_only_the_culprit_requeued() -> None:
    from consumers.amqp import Ack, Requeue
    from consumers.job_state import JobStateHandler

    events = [transition(f"job-{n}", "site-1") for n in range(5)]
    store = _PoisonedStore(str(events[2].event_id))
    handler = JobStateHandler(store, NAMES)  # type: ignore[arg-type]
    batch = [_delivery(e.to_json(), "transition.fail") for e in events]
    settled = handler._process_safely(batch)
    assert [type(action) for _, action in settled] == [Ack, Ack, Requeue, Ack, Ack]
    assert [store.inner.get(f"job-{n}") is not None for n in range(5)] == [
        True, True, False, True, True
    ]  # fmt: skip
