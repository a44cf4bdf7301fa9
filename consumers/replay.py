"""Replay: the daemons' own decision code run over archived events, in memory. Pure.

``Replayer.feed`` takes events one at a time, in the order given (archive or file order, never
re-sorted), and does with each what the two daemons do:

- an exit event goes through ``decide`` (the classifier's rule); a fail or stop becomes
  ``to_transition`` (the classifier's message) and is applied with ``MemoryStore.apply_batch``
  (the job-state consumer's store semantics: inbox, duplicates, terminal states, sites). An
  ignored exit reaches no store, as live, but stays in its job's timeline;
- a lifecycle event is applied to the store as it is;
- a transition is the live classifier's output: replay re-derives its own from the exits, so
  an archived transition is only kept, by event id, to show what the live pipeline decided.

Every history row is recorded at its event's ``occurred_at`` (the exit's, for a transition),
so the same events replayed twice give identical output.

``compare`` sets two replays of the same events side by side: the jobs whose final status
differs, and for each the first event after which the two statuses parted, which is always an
exit the two policies decided differently (the same decision on the same state has the same
effect). A different decision that changed nothing (on a finished job, from a foreign site)
is not what made the difference, so it is passed over.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol
from uuid import UUID

import orjson

from consumers.policy import Decision, Policy, decide, to_transition
from consumers.senders import refusal, sender_of
from consumers.store import JobView
from consumers.store.memory import MemoryStore
from schemas.codes import Action, JobStatus
from schemas.events import (
    MAX_BODY_BYTES,
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

Replayed = ExitEvent | LifecycleEvent
NOT_REPORTED = "not_reported"  # an exit the policy ignores: the classifier sends nothing on
DUPLICATE = "duplicate"  # an event id the store has seen: no effect, no row
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Step(NamedTuple):
    """One event of a job's timeline, what was decided and what it did.

    ``decision`` is None for a lifecycle event. ``outcome`` is the store's (``applied``,
    ``ignored_terminal``, ``ignored_foreign_site``, ``ignored_backward``), or ``duplicate``,
    or ``not_reported`` for an exit the policy ignores. A NamedTuple: one is made per event.
    """

    event: Replayed
    decision: Decision | None
    outcome: str
    status_before: JobStatus | None
    status_after: JobStatus | None


@dataclass(frozen=True)
class Unreadable:
    """An input that is not a valid event: where it was (``line 7``, ``offset 12``) and why."""

    where: str
    reason: str


@dataclass
class Replay:
    """What one policy made of the events: timelines, final states, the live transitions."""

    policy: Policy
    store: MemoryStore
    timelines: dict[str, list[Step]] = field(default_factory=dict)  # first-seen job order
    live: dict[UUID, Transition] = field(default_factory=dict)
    events: int = 0
    _status: dict[str, JobStatus | None] = field(default_factory=dict, repr=False)

    def status(self, job_id: str) -> JobStatus | None:
        """The job's final status; None when no event of it reached the store."""
        return self._status.get(job_id)

    def view(self, job_id: str) -> JobView | None:
        """The job as ``jobs show`` would show it from the daemons' store."""
        return self.store.get(job_id)


class Replayer:
    """Feeds events, one at a time, through ``decide``, ``to_transition`` and the store."""

    def __init__(self, policy: Policy) -> None:
        self._now = _EPOCH
        self.result = Replay(policy, MemoryStore(clock=self._clock))
        self._policy = policy
        self._store = self.result.store
        self._timelines = self.result.timelines
        self._status = self.result._status

    def _clock(self) -> datetime:
        return self._now

    def feed(self, event: Event) -> None:
        """Replay one event (a transition is only kept for comparison)."""
        self.result.events += 1
        if isinstance(event, ExitEvent):
            step = self._exited(event)
        elif isinstance(event, LifecycleEvent):
            step = self._apply(event, event, None)
        else:
            self.result.live[event.event_id] = event
            return
        timeline = self._timelines.get(event.job_id)
        if timeline is None:
            self._timelines[event.job_id] = [step]
        else:
            timeline.append(step)

    def _exited(self, event: ExitEvent) -> Step:
        decision = decide(event, self._policy)
        if decision.action is Action.IGNORE:
            status = self._status.get(event.job_id)
            return Step(event, decision, NOT_REPORTED, status, status)
        return self._apply(event, to_transition(event, decision), decision)

    def _apply(
        self, event: Replayed, job_event: Transition | LifecycleEvent, decision: Decision | None
    ) -> Step:
        self._now = event.occurred_at
        applied = self._store.apply_one(job_event)
        if applied.duplicate:
            status = self._status.get(event.job_id)
            return Step(event, decision, DUPLICATE, status, status)
        row = applied.row
        self._status[event.job_id] = row.status_after
        return Step(event, decision, row.outcome.value, row.status_before, row.status_after)


def replay(events: Iterable[Event], policy: Policy) -> Replay:
    """Replay ``events`` in order under ``policy``."""
    replayer = Replayer(policy)
    feed = replayer.feed
    with gc_paused():
        for event in events:
            feed(event)
    return replayer.result


@contextmanager
def gc_paused(freeze: bool = False) -> Iterator[None]:
    """No cyclic garbage collection inside the block.

    A replay keeps every event, row and step it makes until the end, and makes no cycles, so
    the collector's passes over an ever larger heap find nothing; they took half the time of a
    100,000-event replay. Reference counting still frees everything short-lived. With
    ``freeze``, what exists at the end is moved out of the collector's sight for good (for a
    command that holds it until it exits), so the first collection after the block does not
    walk all of it either.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checks:
    """The live pipeline's sender checks (``consumers.senders``), as replay applies them."""

    names: Names
    require_site_user: bool = False

    def refusal(self, names: Names, routing_key: str, event: Event, sender: str | None) -> str:
        """Why the live pipeline refuses the event from this sender; '' when it takes it."""
        return refusal(names, routing_key, event, sender, self.require_site_user) or ""


# ``archive export`` writes each message as an envelope that keeps what the sender checks need:
# {"namespace": .., "routing_key": .., "sender": .. | null, "body": {the event}}. A line that is
# a plain body (it has "schema") is replayed without the checks, as DESIGN 6 allows.
ENVELOPE_KEYS = frozenset({"namespace", "routing_key", "sender", "body"})
_ENVELOPE_BYTES = 2048  # room for the envelope's own fields around a body of the maximum size


def parse_lines(lines: Iterable[bytes], checks: Checks) -> Iterator[Event | Unreadable]:
    """The events of a JSON-lines text, one body or envelope per line; blank lines skipped."""
    for number, line in enumerate(lines, start=1):
        try:
            yield _line_event(line, checks)
        except BadMessage as exc:
            if line.strip():
                yield Unreadable(f"line {number}", exc.reason)


def _line_event(line: bytes, checks: Checks) -> Event:
    if len(line) > MAX_BODY_BYTES + _ENVELOPE_BYTES:
        raise BadMessage(f"line: {len(line)} bytes, over the limit of {MAX_BODY_BYTES}")
    event = _well_formed_line(line, checks)
    if event is not None:
        return event
    obj = read_json(line)
    if isinstance(obj, dict) and "schema" not in obj and "body" in obj:
        return _enveloped(obj, checks)
    _within_limit(len(line.rstrip(b"\r\n")))  # a bare body: the line is the body
    return parse_object(obj)


def _well_formed_line(line: bytes, checks: Checks) -> Event | None:
    """The shortcut (``schemas.events.well_formed``) for a line as ``archive export`` writes it;
    None sends the line down the full path, which gives the same event or names the problem."""
    text = line.rstrip(b"\r\n")
    obj = canonical_json(text)
    if obj is None:
        return None
    if "schema" in obj:
        return well_formed(obj) if len(text) <= MAX_BODY_BYTES else None
    ns, key, sender = obj.get("namespace"), obj.get("routing_key"), obj.get("sender")
    if (
        obj.keys() != ENVELOPE_KEYS
        or type(ns) is not str
        or not ns
        or type(key) is not str
        or (sender is not None and type(sender) is not str)
    ):
        return None
    event = well_formed(obj["body"])
    if event is None:
        return None
    _within_limit(len(orjson.dumps(obj["body"])))
    return _checked((ns, key, sender), event, checks)


def _within_limit(size: int) -> None:
    # The live consumers refuse a body over the limit, so replay must not take it either.
    if size > MAX_BODY_BYTES:
        raise BadMessage(f"body: {size} bytes, over the limit of {MAX_BODY_BYTES}")


def _enveloped(envelope: dict[str, object], checks: Checks) -> Event:
    unknown = sorted(set(envelope) - ENVELOPE_KEYS)
    if unknown:
        raise BadMessage(f"{unknown[0][:100]}: unknown envelope field")
    ns, key, sender = envelope.get("namespace"), envelope.get("routing_key"), envelope.get("sender")
    if not isinstance(ns, str) or not ns:
        raise BadMessage("namespace: the envelope needs the namespace it was archived in")
    if not isinstance(key, str):
        raise BadMessage("routing_key: the envelope needs the message's routing key")
    if sender is not None and not isinstance(sender, str):
        raise BadMessage("sender: must be a string or null")
    body = envelope["body"]
    _within_limit(len(orjson.dumps(body)))  # at least its compact form, as export writes it
    return _checked((ns, key, sender), parse_object(body), checks)


def _checked(where: tuple[str, str, str | None], event: Event, checks: Checks) -> Event:
    """``event``, from an envelope's body, unless the live daemons refuse it from ``where``
    (the envelope's namespace, routing key and sender)."""
    ns, key, sender = where
    names = checks.names if ns == checks.names.ns else Names(ns)
    problem = checks.refusal(names, key, event, sender)
    if problem:
        raise BadMessage(f"refused as live: {problem}")
    return event


class Archived(Protocol):
    """What replay needs of an archived message (``consumers.archive.Archived``)."""

    @property
    def offset(self) -> int: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def headers(self) -> Any: ...


def parse_archived(messages: Iterable[Archived], checks: Checks) -> Iterator[Event | Unreadable]:
    """The events of archived messages, each judged as the live daemons judged it."""
    names = checks.names
    for message in messages:
        try:
            event = parse_body(message.body)
        except BadMessage as exc:
            yield Unreadable(f"offset {message.offset}", exc.reason)
            continue
        sender = sender_of(names, message.user_id, message.headers)
        problem = checks.refusal(names, message.routing_key, event, sender)
        if problem:
            yield Unreadable(f"offset {message.offset}", f"refused as live: {problem}")
        else:
            yield event


# -- a job's exits ---------------------------------------------------------------------------


def job_exits(
    items: Iterable[Event | Unreadable], job_id: str, policy: Policy
) -> list[dict[str, object]]:
    """Every exit event of ``job_id`` among ``items``, with what ``policy`` decides of it.

    The ``exits`` of ``jobs show --json`` (DESIGN 6): the exits the policy ignored included,
    which never reach the store, in the order given (the archive's).
    """
    return [
        exit_record(item, decide(item, policy))
        for item in items
        if isinstance(item, ExitEvent) and item.job_id == job_id
    ]


def timeline_exits(replay: Replay, job_id: str) -> list[dict[str, object]]:
    """The ``exits`` of a replayed job: every exit of its timeline, as ``jobs show`` has them."""
    return [
        exit_record(step.event, step.decision)
        for step in replay.timelines.get(job_id, ())
        if isinstance(step.event, ExitEvent) and step.decision is not None
    ]


def exit_record(event: ExitEvent, decision: Decision) -> dict[str, object]:
    """One entry of ``exits`` (DESIGN 6): the exit and what the policy decided of it."""
    return {
        "event_id": str(event.event_id),
        "site": event.site,
        "code": event.effective_code.name,
        "return_code": event.return_code,
        "stage": event.stage.value if event.stage else None,
        "decision": decision.action.value,
        "rule": decision.policy.rule,
        "occurred_at": event.occurred_at.isoformat().replace("+00:00", "Z"),
    }


# -- comparing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A job whose final status differs, and the event (with each policy's step) that did it."""

    job_id: str
    status: JobStatus | None
    other_status: JobStatus | None
    step: Step | None
    other_step: Step | None

    @property
    def event_id(self) -> str | None:
        """The id of the event after which the job's statuses parted."""
        return str(self.step.event.event_id) if self.step else None

    @property
    def rule(self) -> str | None:
        """The rule of the first policy that decided that event."""
        return _rule(self.step)

    @property
    def other_rule(self) -> str | None:
        """The rule of the other policy that decided that event."""
        return _rule(self.other_step)

    def as_json(self) -> dict[str, str | None]:
        """One entry of ``replay --json``'s ``differences``."""
        return {
            "job_id": self.job_id,
            "status": _value(self.status),
            "other_status": _value(self.other_status),
            "event_id": self.event_id,
            "rule": self.rule,
            "other_rule": self.other_rule,
        }


def compare(a: Replay, b: Replay) -> list[Difference]:
    """The jobs whose final status differs between two replays of the same events."""
    differences = []
    for job_id in {**a.timelines, **b.timelines}:
        status, other = a.status(job_id), b.status(job_id)
        if status != other:
            step, other_step = _parting(a.timelines.get(job_id, []), b.timelines.get(job_id, []))
            differences.append(Difference(job_id, status, other, step, other_step))
    return differences


def _parting(steps: list[Step], others: list[Step]) -> tuple[Step | None, Step | None]:
    """The first pair of steps after which the job's status differs."""
    for step, other in zip(steps, others, strict=False):
        if step.status_after != other.status_after:
            return step, other
    return None, None


def _rule(step: Step | None) -> str | None:
    return step.decision.policy.rule if step is not None and step.decision is not None else None


def _value(status: JobStatus | None) -> str | None:
    return status.value if status is not None else None
