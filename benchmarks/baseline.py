"""The raw pika two-hop baseline, one role per process (``python -m benchmarks.baseline ROLE``).

publisher -> q1 -> relay (validates with pydantic, republishes with confirms, acks after the
confirm with ``multiple=True``) -> q2 -> sink (acks with ``multiple=True``). This is the best
a careful hand-written pika pipeline does on this machine; exitpipe is measured against it.

The sink prints one JSON line when it has seen ``count`` messages: its first and last
receive time and every publish-to-receive latency (the publisher stamps ``x-t`` in a header).
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection
from pika.spec import BasicProperties

from schemas.events import ExitEvent

PERSISTENT = 2


def _connect(url: str, on_channel: Any) -> SelectConnection:
    params = pika.URLParameters(url)
    return SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _reason: c.ioloop.stop(),
    )


def relay(url: str, source: str, target: str, prefetch: int) -> None:
    """Validate, forward with confirms, ack inputs in order once their forwards are confirmed."""
    state: dict[str, Any] = {"seq": 0}
    # "x:NAME" forwards through exchange NAME (the archive variant fans out to a stream too).
    exchange, key = (target[2:], "") if target.startswith("x:") else ("", target)
    pending: OrderedDict[int, int] = OrderedDict()  # publish seq -> input delivery tag

    def on_confirm(frame: Any) -> None:
        tag, last = None, frame.method.delivery_tag
        while pending and next(iter(pending)) <= last:
            _, tag = pending.popitem(last=False)
        if tag is not None:
            state["ch"].basic_ack(tag, multiple=True)

    def on_message(ch: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        ExitEvent.model_validate_json(body)
        ch.basic_publish(exchange, key, body, props)
        state["seq"] += 1
        pending[state["seq"]] = method.delivery_tag

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        ch.confirm_delivery(
            on_confirm,
            callback=lambda _f: ch.basic_qos(
                prefetch_count=prefetch, callback=lambda _q: ch.basic_consume(source, on_message)
            ),
        )

    _connect(url, on_channel).ioloop.start()


def sink(url: str, source: str, count: int, prefetch: int) -> None:
    """Ack in batches; print the receive times and latencies when ``count`` have arrived."""
    latencies: list[float] = []
    times: dict[str, float] = {}
    state: dict[str, Any] = {"unacked": 0, "tag": 0}

    def flush() -> None:
        if state["ch"].is_closing or state["ch"].is_closed:
            return
        if state["unacked"]:
            state["ch"].basic_ack(state["tag"], multiple=True)
            state["unacked"] = 0
        state["conn"].ioloop.call_later(0.005, flush)

    def on_message(ch: Any, method: Any, props: BasicProperties, _body: bytes) -> None:
        now = time.time()
        times.setdefault("first", now)
        latencies.append(now - float(props.headers["x-t"]))
        state["tag"], state["unacked"] = method.delivery_tag, state["unacked"] + 1
        if state["unacked"] >= 64:
            ch.basic_ack(method.delivery_tag, multiple=True)
            state["unacked"] = 0
        if len(latencies) >= count:
            ch.basic_ack(method.delivery_tag, multiple=True)
            print(json.dumps({"first": times["first"], "last": now, "latencies": latencies}))
            sys.stdout.flush()
            state["conn"].close()

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        ch.basic_qos(
            prefetch_count=prefetch, callback=lambda _q: ch.basic_consume(source, on_message)
        )
        flush()

    conn = _connect(url, on_channel)
    state["conn"] = conn
    conn.ioloop.start()


def main(argv: list[str]) -> None:
    """``relay URL SOURCE TARGET PREFETCH`` or ``sink URL SOURCE COUNT PREFETCH``."""
    role, url, source, third, prefetch = argv
    if role == "relay":
        relay(url, source, third, int(prefetch))
    else:
        sink(url, source, int(third), int(prefetch))


if __name__ == "__main__":
    main(sys.argv[1:])
