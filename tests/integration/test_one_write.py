"""OneWriteConnection: a loop turn's frames reach the socket as one write, all in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pika
import pytest

from producers.connection import Nodes, OneWriteConnection

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(amqp_url: str, namespace: str) -> Iterator[str]:
    name = f"{namespace}.one-write"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_delete(name)
    conn.close()


def _connect(amqp_url: str, on_channel: Any) -> OneWriteConnection:
    """A connection that opens a channel and stops its loop once closed."""
    return OneWriteConnection(
        Nodes(amqp_url).current,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _r: c.ioloop.stop(),
    )


def test_a_turn_of_publishes_is_one_write_and_every_message_arrives_in_order(
    amqp_url: str, queue: str
) -> None:
    count = 300
    state: dict[str, Any] = {"writes": 0, "confirmed": 0}

    def on_confirm(frame: Any) -> None:
        state["confirmed"] = frame.method.delivery_tag
        if state["confirmed"] == count:
            state["writes_before_close"] = state["writes"]
            conn.close()

    def publish_all(channel: Any) -> None:
        transport = conn._transport
        write = transport.write

        def counted(data: bytes) -> None:
            state["writes"] += 1
            write(data)

        transport.write = counted
        for n in range(count):  # one loop turn: a callback that publishes them all
            channel.basic_publish("", queue, f"{n}".encode())

    def on_channel(channel: Any) -> None:
        channel.confirm_delivery(on_confirm, callback=lambda _f: publish_all(channel))

    conn = _connect(amqp_url, on_channel)
    conn.ioloop.start()

    assert state["confirmed"] == count
    assert state["writes_before_close"] == 1, "one turn of publishes took more than one write"
    check = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = check.channel()
        bodies = []
        for _ in range(count):
            _method, _props, body = channel.basic_get(queue, auto_ack=True)
            bodies.append(body)
        assert bodies == [f"{n}".encode() for n in range(count)]
    finally:
        check.close()


def test_frames_still_go_out_after_a_turn_whose_timers_pika_dropped(
    amqp_url: str, queue: str
) -> None:
    # When one due timer raises, pika drops the turn's other due timers, the one that sends
    # the gathered frames included. The loop is started again (as the consumer does after an
    # error in its loop); what is written later still goes out, with what was waiting.
    state: dict[str, Any] = {"confirmed": 0}

    def boom() -> None:
        raise RuntimeError("a timer that fails")

    def on_confirm(frame: Any) -> None:
        state["confirmed"] = frame.method.delivery_tag
        if state["confirmed"] == 2:
            conn.close()

    def first(channel: Any) -> None:
        conn.ioloop.call_later(0, boom)
        channel.basic_publish("", queue, b"first")  # its zero timer is set after boom's
        conn.ioloop.call_later(0.8, lambda: channel.basic_publish("", queue, b"second"))

    def on_channel(channel: Any) -> None:
        channel.confirm_delivery(on_confirm, callback=lambda _f: first(channel))

    conn = _connect(amqp_url, on_channel)
    conn.ioloop.call_later(10, conn.ioloop.stop)  # a stuck connection fails, never hangs
    with pytest.raises(RuntimeError, match="a timer that fails"):
        conn.ioloop.start()
    conn.ioloop.start()
    assert state["confirmed"] == 2, "frames written after the dropped timer never went out"
