"""A memory alarm: publishers are blocked, time out, and nothing is reported as sent."""

from __future__ import annotations

import time

import pytest

from producers.publisher import Outcome, Publisher, outgoing
from tests.faults.conftest import Scenario
from tests.faults.harness import HEARTBEAT, Producer, daemons, flat, publish_outcomes, workload

pytestmark = pytest.mark.faults


def test_memory_alarm(scenario: Scenario) -> None:
    history = scenario.history()
    jobs = workload(300)
    first, blocked, rest = flat(jobs[:100]), flat(jobs[100:150]), flat(jobs[150:])
    with daemons(scenario.daemon("run")):
        Producer(scenario.url, history, first).run()
        with scenario.rabbit.memory_alarm():
            start = time.monotonic()
            with Publisher(scenario.url, heartbeat=HEARTBEAT, retry_seconds=2) as publisher:
                outcomes = publish_outcomes(
                    publisher, [outgoing(scenario.names, e) for e in blocked]
                )
            took = time.monotonic() - start
            assert Outcome.CONFIRMED not in outcomes, "a blocked publish reported as sent"
            assert took < 20, f"the blocked publish took {took:.1f}s"
            for event, outcome in zip(blocked, outcomes, strict=True):
                history.add(event, str(event.event_id), outcome.value.replace("confirmed", "ok"))
        healed = time.monotonic()
        producer = Producer(scenario.url, history, rest)
        producer.run()
        assert producer.error is None, repr(producer.error)
        line = scenario.checker(history).run(healed_at=healed)
    assert line["indeterminate"] == len(blocked)
