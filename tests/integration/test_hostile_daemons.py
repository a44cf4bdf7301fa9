"""Hostile input against the running daemons on the real broker (issue 11).

Each test failed before its fix: the 5,000-digit integer that killed job-state's worker (and
was requeued to the delivery limit by the classifier), the transition sent with a lifecycle
key, the dead letter that expired with its original's ``expiration``, the settle that reached a
channel already closed and ended the consume thread, and a worker thread whose death went
unnoticed while ``/healthz`` said 200.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from consumers.amqp import ACK, Consumer, ConsumerConfig, Delivery, Forward, Requeue
from consumers.archive import Archive
from consumers.dead_letters import DeadLetters
from consumers.observe import LOOP_ERRORS, RECONNECTS
from consumers.state import JobEvent
from consumers.store import Applied, StoreUnavailable
from consumers.store.factory import open_store
from exitpipe.runtime import EX_SOFTWARE, Pipeline
from producers.broker import declare_topology
from schemas.codes import Code, JobStatus
from schemas.topology import ERROR_HEADER, SOURCE_HEADER, Names, topology
from tests.conftest import RawTimestamp
from tests.faults.harness import free_port
from tests.strategies import transition
from tests.support.pipeline import (
    count,
    drain,
    exit_event,
    lifecycle,
    publish_raw,
    running,
    send,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration
HUGE = b"9" * 5000


def _status(store_url: str, job_id: str) -> JobStatus | None:
    store = open_store(store_url)
    try:
        job = store.get(job_id)
        return job.status if job else None
    finally:
        store.close()


def _dead(amqp_url: str, names: Names) -> dict[str | None, Any]:
    return {p.message_id: p for p, _ in drain(amqp_url, names.dead_letters)}


def test_a_huge_number_is_dead_lettered_at_once_and_both_daemons_keep_applying(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    names = Names(namespace)
    exit_body = exit_event("j-1", "site-1", Code.EXCEPTION).to_json()[:-1] + b',"return_code":'
    exit_body += HUGE + b"}"
    life_body = lifecycle("j-1", JobStatus.RUNNING).to_json()[:-1] + b',"n":' + HUGE + b"}"
    with running(settings_for(amqp_url, namespace, store_url)) as pipeline:
        publish_raw(amqp_url, names.events, "exit.site-1", exit_body, message_id="huge-exit")
        publish_raw(amqp_url, names.jobs, "lifecycle.RUNNING", life_body, message_id="huge-life")
        wait_until(lambda: count(amqp_url, names.dead_letters) == 2)
        send(amqp_url, namespace, [lifecycle("j-2", JobStatus.RUNNING)])
        send(amqp_url, namespace, [exit_event("j-2", "site-1", Code.EXCEPTION)])
        wait_until(lambda: _status(store_url, "j-2") is JobStatus.FINISHED_EXECUTION_EXCEPTION)
        assert pipeline.healthy
    dead = _dead(amqp_url, names)
    for message_id, source in (("huge-exit", names.classify), ("huge-life", names.job_state)):
        headers = dead[message_id].headers
        assert headers[ERROR_HEADER].startswith("body: not JSON (a number too large")
        assert headers[SOURCE_HEADER] == source
        assert "x-death" not in headers, "dead-lettered at its first delivery, not by the limit"


def test_a_transition_under_a_lifecycle_key_is_refused(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    names = Names(namespace)
    forged = transition("j-forged", "site-1")
    with running(settings_for(amqp_url, namespace, store_url)):
        publish_raw(amqp_url, names.jobs, "lifecycle.RUNNING", forged.to_json(), message_id="f")
        wait_until(lambda: count(amqp_url, names.dead_letters) == 1)
    assert _status(store_url, "j-forged") is None
    (props,) = _dead(amqp_url, names).values()
    assert props.headers[ERROR_HEADER].startswith("routing key: 'lifecycle.RUNNING'")


def test_a_dead_letter_does_not_expire_with_its_original(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    names = Names(namespace)
    with running(settings_for(amqp_url, namespace, f"sqlite:///{tmp_path / 'j.db'}")):
        publish_raw(
            amqp_url, names.events, "exit.site-1", b"{bad", message_id="ttl", expiration="1000"
        )
        wait_until(lambda: count(amqp_url, names.dead_letters) == 1)
    # Longer than the original's 1 s expiration: the dead letter must still be there.
    threading.Event().wait(2.5)
    (props,) = _dead(amqp_url, names).values()
    assert props.message_id == "ttl" and props.expiration is None


class _ClosingHandler:
    """Closes the channel under the consumer, then asks for a settle on it."""

    def __init__(self) -> None:
        self.consumer: Consumer | None = None
        self.seen: list[bytes] = []
        self.closed_once = False

    def handle(self, delivery: Delivery) -> Requeue | None:
        self.seen.append(delivery.body)
        if not self.closed_once:
            self.closed_once = True
            assert self.consumer is not None and self.consumer._channel is not None
            self.consumer._channel.close()  # as the broker does on a channel error
            return Requeue()  # settled on the closing channel: pika refuses the nack
        return None


def test_a_settle_on_a_closed_channel_reconnects_instead_of_ending_the_consumer(
    amqp_url: str, namespace: str
) -> None:
    names = Names(namespace)
    declare_topology(amqp_url, topology(namespace))
    handler = _ClosingHandler()
    config = ConsumerConfig(amqp_url, names.classify, names.dead, heartbeat=5, name="t")
    consumer = Consumer(config, handler)
    handler.consumer = consumer
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        publish_raw(amqp_url, names.events, "exit.site-1", b"first")
        # The message comes back on the next channel: the consumer is alive and consuming.
        wait_until(lambda: len(handler.seen) >= 2 and consumer.connected, timeout=20)
        assert thread.is_alive()
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive()


class _DyingStore:
    """A store whose worker-side call ends the thread (a bug that is not an Exception)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def apply_batch(self, events: Sequence[JobEvent]) -> list[Applied]:
        raise SystemExit("worker thread ends")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_dead_worker_thread_turns_healthz_503_and_the_daemon_exits_non_zero(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings_for(
        amqp_url, namespace, f"sqlite:///{tmp_path / 'j.db'}", metrics_port=port
    )
    store = _DyingStore(open_store(settings.store))
    pipeline = Pipeline(settings, store=store)  # type: ignore[arg-type]
    status: list[int] = []
    runner = threading.Thread(target=lambda: status.append(_run(pipeline)), daemon=True)
    runner.start()
    try:
        wait_until(lambda: pipeline.healthy, timeout=15)
        assert _healthz(port) == 200
        send(amqp_url, namespace, [lifecycle("j-1", JobStatus.RUNNING)])
        wait_until(lambda: not pipeline.healthy, timeout=15)
        assert any(p.startswith("job-state worker stopped") for p in pipeline.problems)
        runner.join(30)
        assert status == [EX_SOFTWARE]
    finally:
        pipeline.stop()
        runner.join(30)


class _AwayStore:
    """A store that is unreachable until ``back`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.back = threading.Event()

    def apply_batch(self, events: Sequence[JobEvent]) -> list[Applied]:
        if not self.back.is_set():
            raise StoreUnavailable("the database is away")
        result: list[Applied] = self.inner.apply_batch(events)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_healthz_is_503_while_the_store_is_away_and_200_once_it_is_back(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings_for(
        amqp_url, namespace, f"sqlite:///{tmp_path / 'j.db'}", metrics_port=port
    )
    store = _AwayStore(open_store(settings.store))
    pipeline = Pipeline(settings, store=store)  # type: ignore[arg-type]
    runner = threading.Thread(target=lambda: _run(pipeline), daemon=True)
    runner.start()
    try:
        wait_until(lambda: pipeline.healthy, timeout=15)
        send(amqp_url, namespace, [lifecycle("j-away", JobStatus.RUNNING)])
        wait_until(lambda: _healthz_text(port) == (503, "job-state store unavailable\n"))
        store.back.set()
        wait_until(lambda: _healthz_text(port) == (200, "ok\n"))
        wait_until(lambda: store.inner.get("j-away") is not None)
    finally:
        pipeline.stop()
        runner.join(30)
    assert pipeline.exit_status == 0


def _healthz_text(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _run(pipeline: Pipeline) -> int:
    pipeline.start()
    pipeline.wait()
    return pipeline.exit_status


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.usefixtures("raw_timestamps")
def test_a_header_pika_cannot_decode_stalls_nothing(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    # A timestamp past year 9999: RabbitMQ passes it on, pika's own decoder raises on it, and
    # each consumer used to reconnect over it until the delivery limit took it, good exits
    # delivered beside it included; dead list, replay and archive export failed on it too.
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    names = Names(namespace)
    evil = {"evil": RawTimestamp(2**64 - 1)}
    reconnects = RECONNECTS.labels("classifier")._value.get()
    with running(settings_for(amqp_url, namespace, store_url)):
        send(amqp_url, namespace, [lifecycle("j-evil", JobStatus.RUNNING)])
        good = exit_event("j-evil", "site-1", Code.EXCEPTION).to_json()
        publish_raw(amqp_url, names.events, "exit.site-1", good, headers=evil)
        publish_raw(amqp_url, names.events, "exit.site-1", b"{bad", message_id="b", headers=evil)
        wait_until(lambda: _status(store_url, "j-evil") is JobStatus.FINISHED_EXECUTION_EXCEPTION)
        wait_until(lambda: count(amqp_url, names.dead_letters) == 1)
    assert RECONNECTS.labels("classifier")._value.get() == reconnects
    (letter,) = DeadLetters(amqp_url, names).browse()  # `exitpipe dead list` reads it
    assert letter.message_id == "b" and letter.reason.startswith("body: not JSON")
    # pika cannot write that value back either: the dead letter keeps exitpipe's headers only.
    assert "evil" not in letter.properties.headers
    archived = [m.routing_key for m in Archive(amqp_url, names.archive).read()]
    assert archived.count("exit.site-1") == 2  # replay and archive export read past it


class _Holding:
    """Settles nothing itself: the test settles from another thread, as job-state does."""

    def __init__(self) -> None:
        self.held: list[Delivery] = []

    def handle(self, delivery: Delivery) -> None:
        self.held.append(delivery)


def test_an_exception_in_the_io_loop_reconnects_and_the_delivery_comes_back(
    amqp_url: str, namespace: str
) -> None:
    # A settle from another thread runs as an I/O-loop callback: what it raises escapes
    # pika (here, a forward whose body cannot be encoded: a bug in a handler's output).
    names = Names(namespace)
    declare_topology(amqp_url, topology(namespace))
    handler = _Holding()
    config = ConsumerConfig(amqp_url, names.classify, names.dead, heartbeat=5, name="loop-test")
    consumer = Consumer(config, handler)
    errors = LOOP_ERRORS.labels("loop-test")._value.get()
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        publish_raw(amqp_url, names.events, "exit.site-1", b"once")
        first = wait_until(lambda: handler.held and handler.held[0], timeout=20)
        bad = Forward(names.jobs, "transition.fail", "\ud800", "x")  # type: ignore[arg-type]
        consumer.settle([(first, bad)])
        again = wait_until(lambda: len(handler.held) > 1 and handler.held[1], timeout=20)
        assert again.body == b"once" and again.redelivered
        consumer.settle([(again, ACK)])
        wait_until(lambda: count(amqp_url, names.classify) == 0, timeout=20)
        assert LOOP_ERRORS.labels("loop-test")._value.get() == errors + 1
        assert thread.is_alive() and consumer.connected
    finally:
        consumer.stop()
        thread.join(30)
