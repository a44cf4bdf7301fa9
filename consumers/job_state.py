"""The job-state handler: transitions and lifecycle events in, store commits out.

Deliveries are applied in small batches, one transaction each, in a worker thread so that the
I/O loop keeps heartbeats alive while the database works; after the commit every delivery of
the batch is settled at once, which the adapter turns into one ``multiple=True`` ack. A store
outage is retried here, in process, so it never burns the broker's delivery limit.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from consumers.amqp import ACK, Action, Delivery, Requeue, dead_letter
from consumers.observe import EVENTS, LOOP_ERRORS, STORE_RETRIES, DecisionLog
from consumers.senders import job_event_problem, sender_of
from consumers.state import JobEvent
from consumers.store import Applied, Store, StoreError, StoreUnavailable
from schemas.events import (
    LIFECYCLE_SCHEMA,
    TRANSITION_SCHEMA,
    BadMessage,
    ExitEvent,
    parse_body,
)
from schemas.topology import Names

log = logging.getLogger("exitpipe.job_state")
_ACCEPT = frozenset({TRANSITION_SCHEMA, LIFECYCLE_SCHEMA})
FAULT_ENV = "EXITPIPE_FAULT"
Settle = Callable[[Sequence[tuple[Delivery, Action]]], None]


def _fault_point() -> str | None:
    # Off unless the fault-injection suite sets it: kills the process at a named point.
    return os.environ.get(FAULT_ENV) or None


class JobStateHandler:
    """Queues deliveries for the worker thread, which applies them and settles them."""

    def __init__(
        self,
        store: Store,
        names: Names,
        *,
        batch_size: int = 200,
        batch_wait: float = 0.0,
    ) -> None:
        self.store = store
        self.names = names
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self._queue: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._settle: Settle = lambda items: None
        self._abandon = threading.Event()
        self._fault = _fault_point()
        self._decisions = DecisionLog("exitpipe.job_state")
        self._thread = threading.Thread(target=self._work, name="job-state-worker", daemon=True)
        self.store_down = False  # true while a store outage is being retried
        self.failure: BaseException | None = None  # why the worker thread ended, if it did

    def start(self, settle: Settle) -> None:
        """Start the worker; ``settle`` hands results back to the consumer adapter."""
        self._settle = settle
        self._thread.start()

    @property
    def problems(self) -> list[str]:
        """What is not working, for ``/healthz``; empty when the worker is applying."""
        if not self._thread.is_alive() and self.failure is not None:
            return [f"job-state worker stopped: {self.failure!r}"]
        return ["job-state store unavailable"] if self.store_down else []

    def handle(self, delivery: Delivery) -> None:
        """Queue one delivery; it is settled after its batch commits."""
        self._queue.put(delivery)

    def stop(self, timeout: float = 20.0) -> None:
        """Finish queued work, then end the worker (give up on a store still down at timeout)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(5)

    # -- worker thread ----------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                batch, more = self._next_batch()
                if batch:
                    self._settle(self._process_safely(batch))
                if not more:
                    return
        except BaseException as exc:  # noticed: /healthz turns 503 and the daemon exits 70
            self.failure = exc
            log.critical("job-state worker stopped", exc_info=True)

    def _process_safely(self, batch: Sequence[Delivery]) -> list[tuple[Delivery, Action]]:
        try:
            return self.process(batch)
        except Exception:
            # A bug, not bad input (that is dead-lettered) nor an outage (that is retried).
            # Keep applying: one by one, so that only what fails on its own goes back, and
            # the broker's delivery limit decides about it.
            log.exception("batch of %d could not be processed; one by one", len(batch))
            LOOP_ERRORS.labels("job-state").inc()
            if len(batch) == 1:
                return [(batch[0], Requeue())]
            return [item for d in batch for item in self._process_safely([d])]

    def _next_batch(self) -> tuple[list[Delivery], bool]:
        first = self._queue.get()
        if first is None:
            return [], False
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, False
            batch.append(item)
        return batch, True

    def process(self, batch: Sequence[Delivery]) -> list[tuple[Delivery, Action]]:
        """Parse, apply in one transaction, and say how to settle each delivery."""
        settled: list[tuple[Delivery, Action]] = []
        good: list[tuple[Delivery, JobEvent]] = []
        for delivery in batch:
            props = delivery.properties
            sender = sender_of(self.names, props.user_id, props.headers)
            try:
                event = parse_body(delivery.body, _ACCEPT)
            except BadMessage as exc:
                settled.append((delivery, dead_letter("job-state", delivery, exc.reason, sender)))
                continue
            assert not isinstance(event, ExitEvent)  # excluded by _ACCEPT
            problem = job_event_problem(self.names, delivery.routing_key, event, sender)
            if problem is not None:
                settled.append((delivery, dead_letter("job-state", delivery, problem, sender)))
                continue
            good.append((delivery, event))
        if good:
            settled.extend(self._apply(good))
        return settled

    def _apply(self, good: list[tuple[Delivery, JobEvent]]) -> list[tuple[Delivery, Action]]:
        self._maybe_die("kill-before-effect")
        try:
            results = self._with_retry([event for _, event in good])
        except StoreError:
            log.exception("batch of %d failed; applying one by one", len(good))
            return [self._apply_one(d, e) for d, e in good]
        self._maybe_die("kill-after-commit")
        for (_, event), applied in zip(good, results, strict=True):
            _log_outcome(self._decisions, event, applied)
        return [(d, ACK) for d, _ in good]

    def _apply_one(self, delivery: Delivery, event: JobEvent) -> tuple[Delivery, Action]:
        try:
            (applied,) = self._with_retry([event])
        except StoreError:
            # Neither bad input nor an outage: let the broker's delivery limit decide.
            log.exception("job_id=%s event_id=%s cannot be applied", event.job_id, event.event_id)
            return delivery, Requeue()
        _log_outcome(self._decisions, event, applied)
        return delivery, ACK

    def _with_retry(self, events: list[JobEvent]) -> list[Applied]:
        self._maybe_poison(events)
        retrying = Retrying(
            retry=retry_if_exception_type(StoreUnavailable),
            wait=wait_exponential_jitter(multiplier=0.05, max=5.0),
            stop=lambda _state: self._abandon.is_set(),
            before_sleep=self._store_retry,
            reraise=True,
        )
        results = retrying(self.store.apply_batch, events)
        self.store_down = False
        return results

    def _store_retry(self, state: RetryCallState) -> None:
        self.store_down = True
        _log_store_retry(state)

    def _maybe_poison(self, events: list[JobEvent]) -> None:
        # Fault hook ``job-state:poison:<event_id>``: that event always fails to apply.
        if self._fault and self._fault.startswith("job-state:poison:"):
            poison = self._fault.removeprefix("job-state:poison:")
            if any(str(e.event_id) == poison for e in events):
                raise StoreError(f"fault hook: event {poison} is poison")

    def _maybe_die(self, point: str) -> None:
        if self._fault == f"job-state:{point}":
            log.error("fault hook %s: killing the process", point)
            os.kill(os.getpid(), signal.SIGKILL)


def _log_store_retry(state: RetryCallState) -> None:
    STORE_RETRIES.labels("job-state").inc()
    exc = state.outcome.exception() if state.outcome else None
    log.warning("store unavailable (%s); retry %d", exc, state.attempt_number)


def _log_outcome(decisions: DecisionLog, event: JobEvent, applied: Applied) -> None:
    row = applied.row
    outcome = "duplicate" if applied.duplicate else row.outcome.value
    EVENTS.labels("job-state", row.action, outcome).inc()
    if not decisions.enabled:
        return
    decisions.emit(
        "applied",
        {
            "job_id": event.job_id,
            "event_id": row.event_id,
            "kind": row.kind,
            "site": row.site,
            "code": row.code,
            "decision": row.action,
            "rule": row.policy.rule if row.policy else None,
            "outcome": outcome,
            "status_before": row.status_before,
            "status_after": row.status_after,
        },
    )
