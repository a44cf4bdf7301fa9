"""DESIGN section 4 on a real broker: declare, check, and what the arguments do."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from consumers.archive import Archive
from producers.broker import check_topology, declare_topology
from producers.errors import TopologyMismatch
from schemas.topology import Names, topology

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(amqp_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield conn.channel()
    conn.close()


def redeclare_refused(amqp_url: str, queue: str, arguments: dict[str, object]) -> str:
    """The broker's 406 text for a redeclaration with other arguments ('' if accepted)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments=arguments)
        return ""
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 406
        return str(exc.reply_text)
    finally:
        if conn.is_open:
            conn.close()


def test_declare_is_idempotent_and_check_then_passes(amqp_url: str, namespace: str) -> None:
    topo = topology(namespace)
    declare_topology(amqp_url, topo)
    declare_topology(amqp_url, topo)
    assert check_topology(amqp_url, topo) == []


def test_check_names_every_missing_object_and_creates_nothing(
    amqp_url: str, namespace: str
) -> None:
    topo = topology(namespace)
    problems = check_topology(amqp_url, topo)
    names = Names(namespace)
    for name in (names.events, names.jobs, names.dead):
        assert f"exchange {name}: missing" in problems
    for name in (names.classify, names.job_state, names.archive, names.dead_letters):
        assert f"queue {name}: missing" in problems
    assert f"binding {names.events} -> {names.classify} (exit.#): missing" in problems
    assert len(problems) == 3 + 4 + 5
    assert check_topology(amqp_url, topo) == problems  # the check created nothing


def test_a_queue_declared_with_another_delivery_limit_is_reported(
    amqp_url: str, namespace: str, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    names = Names(namespace)
    classify = topology(namespace).queues[0]
    arguments = {**classify.arguments, "x-delivery-limit": 3}
    channel.queue_declare(names.classify, durable=True, arguments=arguments)
    with pytest.raises(TopologyMismatch, match=rf"queue {names.classify}: .*x-delivery-limit"):
        declare_topology(amqp_url, topology(namespace))
    problems = check_topology(amqp_url, topology(namespace))
    (queue_problem,) = [p for p in problems if p.startswith(f"queue {names.classify}:")]
    assert "declared differently" in queue_problem and "x-delivery-limit" in queue_problem
    assert f"binding {names.events} -> {names.classify} (exit.#): not checked" in "\n".join(
        problems
    )


@pytest.mark.parametrize("queue", ["classify", "job_state"])
def test_work_queues_carry_limit_dead_lettering_and_reject_publish(
    amqp_url: str, namespace: str, queue: str
) -> None:
    topo = topology(namespace, delivery_limit=4)
    declare_topology(amqp_url, topo)
    names = Names(namespace)
    name = getattr(names, queue)
    expected = {
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": names.dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert redeclare_refused(amqp_url, name, expected) == ""
    # The broker holds each argument: changing any one of them is refused.
    for key, other in [
        ("x-delivery-limit", 5),
        ("x-dead-letter-exchange", "elsewhere"),
        ("x-dead-letter-strategy", "at-most-once"),
        ("x-overflow", "drop-head"),
    ]:
        assert f"inequivalent arg '{key}'" in redeclare_refused(
            amqp_url, name, {**expected, key: other}
        )


def test_a_poison_message_reaches_the_dead_letters_past_the_delivery_limit(
    amqp_url: str, namespace: str, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    declare_topology(amqp_url, topology(namespace, delivery_limit=1))
    names = Names(namespace)
    channel.basic_publish(names.events, "exit.site-1", b"{}", pika.BasicProperties(message_id="p"))
    for _ in range(2):  # delivered, requeued; delivered again, requeued: over the limit
        method = _get(channel, names.classify)
        channel.basic_nack(method.delivery_tag, requeue=True)
    method, props, _ = _wait_get(channel, names.dead_letters)
    assert props.message_id == "p" and props.headers["x-death"][0]["queue"] == names.classify
    channel.basic_ack(method.delivery_tag)


def test_the_archive_is_a_stream_bound_to_both_exchanges(
    amqp_url: str, namespace: str, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    declare_topology(amqp_url, topology(namespace))
    names = Names(namespace)
    archive = topology(namespace).queues[2]
    assert "'x-queue-type'" in redeclare_refused(
        amqp_url, names.archive, {**archive.arguments, "x-queue-type": "quorum"}
    )
    channel.confirm_delivery()
    channel.basic_publish(names.events, "exit.s", json.dumps({"n": 1}).encode())
    channel.basic_publish(names.jobs, "lifecycle.RUNNING", json.dumps({"n": 2}).encode())
    channel.basic_qos(prefetch_count=10)
    seen = []
    for method, _, body in channel.consume(
        names.archive, arguments={"x-stream-offset": "first"}, inactivity_timeout=5
    ):
        assert method is not None, f"only {seen} in the archive"
        seen.append((method.exchange, json.loads(body)["n"]))
        channel.basic_ack(method.delivery_tag)
        if len(seen) == 2:
            break
    channel.cancel()
    assert seen == [(names.events, 1), (names.jobs, 2)]


def _get(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> object:
    method, _, _ = _wait_get(channel, queue)
    return method


def _wait_get(
    channel: pika.adapters.blocking_connection.BlockingChannel, queue: str
) -> tuple[object, object, bytes]:
    from tenacity import Retrying, stop_after_delay, wait_fixed

    for attempt in Retrying(stop=stop_after_delay(5), wait=wait_fixed(0.05), reraise=True):
        with attempt:
            method, props, body = channel.basic_get(queue)
            assert method is not None, f"nothing in {queue}"
    return method, props, body


def test_the_archive_keeps_exit_and_lifecycle_events_but_not_transitions(
    amqp_url: str, namespace: str, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    names = Names(namespace)
    declare_topology(amqp_url, topology(namespace))
    # An earlier version bound the archive to every key of the jobs exchange; declaring again
    # retires that binding.
    channel.queue_bind(names.archive, names.jobs, routing_key="#")
    declare_topology(amqp_url, topology(namespace))
    channel.confirm_delivery()
    for exchange, key in [
        (names.events, "exit.site-1"),
        (names.jobs, "lifecycle.RUNNING"),
        (names.jobs, "transition.fail"),
    ]:
        channel.basic_publish(exchange, key, json.dumps({"key": key}).encode())
    archived = [m.routing_key for m in Archive(amqp_url, names.archive).read()]
    assert archived == ["exit.site-1", "lifecycle.RUNNING"]
    assert channel.queue_declare(names.job_state, passive=True).method.message_count == 2
