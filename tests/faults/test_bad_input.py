"""Malformed and schema-invalid messages: dead-lettered with a reason, never applied; and a
poison message that always fails: dead-lettered by the delivery limit while the rest flows."""

from __future__ import annotations

import json
import uuid

import pika
import pytest

from schemas.codes import JobStatus
from tests.faults.conftest import Scenario
from tests.faults.harness import History, Producer, daemons, flat, lifecycle, workload

pytestmark = pytest.mark.faults


def _exit(**fields: object) -> bytes:
    body = {
        "schema": "exitpipe.exit/1",
        "event_id": str(uuid.uuid4()),
        "job_id": "bad-1",
        "site": "site-1",
        "code": "EXCEPTION",
        "return_code": 101,
        "occurred_at": "2026-01-01T00:00:00Z",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def _lifecycle(**fields: object) -> bytes:
    body = {
        "schema": "exitpipe.lifecycle/1",
        "event_id": str(uuid.uuid4()),
        "job_id": "bad-2",
        "status": "RUNNING",
        "occurred_at": "2026-01-01T00:00:00Z",
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def bad_messages(ns: str) -> list[tuple[str, str, bytes]]:
    events, jobs = f"{ns}.events", f"{ns}.jobs"
    return [
        (events, "exit.site-1", b"{not json"),
        (events, "exit.site-1", b"\xff\xfe\x00 not utf-8"),
        (events, "exit.site-1", b"[1, 2, 3]"),
        (events, "exit.site-1", _exit(schema="exitpipe.exit/9")),
        (events, "exit.site-1", _exit(job_id=None)),
        (events, "exit.site-1", _exit(job_id="no spaces allowed")),
        (events, "exit.site-1", _exit(site="s" * 129)),
        (events, "exit.site-1", _exit(colour="blue")),
        (events, "exit.site-1", _exit(code="NO_SUCH_CODE")),
        (events, "exit.site-1", _exit(occurred_at="yesterday")),
        (events, "exit.site-1", _exit(reason="x" * 70_000)),  # above 64 KiB
        (jobs, "lifecycle.RUNNING", b"{}"),
        (jobs, "lifecycle.RUNNING", _lifecycle(status="HALF_DONE")),
        (jobs, "lifecycle.RUNNING", _lifecycle(sites=["a"] * 1001)),
        (jobs, "lifecycle.RUNNING", _exit()),  # an exit event where a transition belongs
        (jobs, "transition.fail", json.dumps({"schema": "exitpipe.transition/1"}).encode()),
    ]


def publish_bad(url: str, history: History) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for exchange, key, body in bad_messages(history.names.ns):
            message_id = str(uuid.uuid4())
            props = pika.BasicProperties(
                delivery_mode=2, content_type="application/json", message_id=message_id
            )
            try:
                ch.basic_publish(exchange, key, body, props, mandatory=True)
                outcome = "ok"
            except pika.exceptions.AMQPError:
                outcome = "fail"
            history.add(None, message_id, outcome, expect_dead=True)
    finally:
        conn.close()


def test_malformed_and_invalid_are_dead_lettered(scenario: Scenario) -> None:
    history = scenario.history()
    events = flat(workload(300))
    with daemons(scenario.daemon("run")):
        producer = Producer(scenario.url, history, events)
        producer.start()
        publish_bad(scenario.url, history)
        producer.finish()
        checker = scenario.checker(history)
        line = checker.run()
    bad = {r.message_id for r in history.records if r.expect_dead}
    assert line["dead_lettered"] == len(bad) == len(bad_messages(scenario.namespace))
    for dead in checker.dead:
        assert dead.message_id in bad
        assert dead.error, "a dead letter without its reason"
        assert dead.source in (scenario.names.classify, scenario.names.job_state)


def test_poison_message_reaches_the_dead_letters_by_the_delivery_limit(scenario: Scenario) -> None:
    history = scenario.history()
    jobs = workload(300)
    poison = lifecycle("poison-1", JobStatus.RUNNING)
    events = [*flat(jobs[:150]), poison, *flat(jobs[150:])]
    hook = f"job-state:poison:{poison.event_id}"
    with daemons(scenario.daemon("classifier"), scenario.daemon("job-state", EXITPIPE_FAULT=hook)):
        producer = Producer(scenario.url, history, events)
        producer.run()
        assert producer.error is None, repr(producer.error)
        for record in history.records:
            record.expect_dead = record.message_id == str(poison.event_id)
        checker = scenario.checker(history)
        line = checker.run()
    (dead,) = checker.dead
    assert dead.message_id == str(poison.event_id)
    assert dead.x_death, "dead-lettered by the broker's delivery limit carries x-death"
    assert line["applied"] > 0  # the rest kept flowing
