"""The topology adapter: declare or check DESIGN section 4 on a broker.

Declaring is rare and one-off (``exitpipe topology``, a daemon's start), so a plain
``BlockingConnection`` does it. A lost or refused connection is retried with backoff for
``retry_seconds``; a failed login and a channel error are not: a declaration the broker
refuses (406 PRECONDITION_FAILED: the object exists with other arguments) is a bug or a
deployment to fix, never weather.

A user that may not configure (403 ACCESS_REFUSED: every daemon under its own broker user,
``producers/users.py``) cannot declare, even what already exists. Declaring then falls back
to checking: each refused exchange and queue is declared passively (which needs no
permission) and must exist; a refused binding is left to the administrator who declared the
topology (bindings cannot be read over AMQP 0-9-1). ``declare_topology`` returns what it
could only check, so a daemon under a restricted user starts on a topology an administrator
declared, and refuses to start, naming the object, on one that is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions
from tenacity import RetryCallState, Retrying, retry_if_exception

from producers.connection import Nodes, connect_blocking, login_refused
from producers.errors import BrokerError, BrokerUnreachable, TopologyMismatch, redact
from producers.publisher import BACKOFF, describe
from schemas.topology import Exchange, Queue, Topology

log = logging.getLogger(__name__)

T = TypeVar("T")
ACCESS_REFUSED = 403
Channel = Any  # pika's BlockingChannel; pika ships no type information


def declare_topology(
    url: str,
    topo: Topology,
    *,
    retry_seconds: float = 30.0,
    connect_timeout: float = 5.0,
    ca_file: Path | str | None = None,
) -> list[str]:
    """Declare every exchange, queue (with its arguments) and binding; idempotent.

    Returns the objects the user may not configure (403), which were only checked to exist
    (bindings: left as they are); empty for a user that may configure. Raises
    ``TopologyMismatch`` naming the first object that exists with other arguments,
    ``BrokerError`` for a refused object that does not exist, ``BrokerUnreachable`` when no
    connection could be had within ``retry_seconds``.
    """
    return _with_connection(
        url, lambda conn: _declare(conn, topo), retry_seconds, connect_timeout, ca_file
    )


def delete_topology(
    url: str,
    topo: Topology,
    *,
    retry_seconds: float = 30.0,
    connect_timeout: float = 5.0,
    ca_file: Path | str | None = None,
) -> None:
    """Delete every queue and exchange of ``topo`` (missing ones are fine): the demo's and the
    tests' clean-up. Messages in the queues are lost, so never point it at a live namespace."""

    def delete(conn: Any) -> None:
        channel = conn.channel()
        for queue in topo.queues:
            channel.queue_delete(queue.name)
        for exchange in topo.exchanges:
            channel.exchange_delete(exchange.name)

    _with_connection(url, delete, retry_seconds, connect_timeout, ca_file)


def check_topology(
    url: str,
    topo: Topology,
    *,
    retry_seconds: float = 30.0,
    connect_timeout: float = 5.0,
    ca_file: Path | str | None = None,
) -> list[str]:
    """One line per missing or differently declared object; empty when all is as declared.

    Each exchange and queue is first declared passively (does it exist?) and then, only if
    it does, declared again with the expected kind and arguments on a fresh channel: the
    broker answers 406 PRECONDITION_FAILED when they differ (a failed declare closes its
    channel, hence one channel per probe). Nothing missing is ever created.

    Bindings cannot be read over AMQP 0-9-1. When a binding's exchange and queue both exist
    as declared, the binding is checked by redeclaring it, which is idempotent: an existing
    binding is left alone and a missing one is put back, so such a binding is never reported
    but is guaranteed afterwards. When an end is missing the binding is reported missing; when
    an end is declared differently, it is reported as not checked.
    """
    return _with_connection(
        url, lambda conn: _check(conn, topo), retry_seconds, connect_timeout, ca_file
    )


@dataclass(frozen=True)
class _Object:
    """An exchange or a queue, with the two ways of declaring it."""

    kind: str
    name: str
    declare: Callable[[Channel], object]
    exists: Callable[[Channel], object]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def _objects(topo: Topology) -> list[_Object]:
    exchanges = [
        _Object(
            "exchange", e.name, partial(_exchange, exchange=e), partial(_exchange_exists, e.name)
        )
        for e in topo.exchanges
    ]
    queues = [
        _Object("queue", q.name, partial(_queue, queue=q), partial(_queue_exists, q.name))
        for q in topo.queues
    ]
    return exchanges + queues


def _bindings(topo: Topology) -> list[tuple[str, str, str]]:
    """(queue, exchange, routing key) of every binding."""
    return [(q.name, exchange, key) for q in topo.queues for exchange, key in q.bindings]


def _retired(topo: Topology) -> list[tuple[str, str, str]]:
    """(queue, exchange, routing key) of every binding an earlier version declared."""
    return [(q.name, exchange, key) for q in topo.queues for exchange, key in q.retired]


def _declare(conn: Any, topo: Topology) -> list[str]:
    only_checked: list[str] = []
    for obj in _objects(topo):
        if only_checked:  # known not to configure: ask no more refusals of the broker
            _must_exist(conn, obj)
            only_checked.append(str(obj))
            continue
        try:
            _on_fresh_channel(conn, obj.declare)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != ACCESS_REFUSED:
                raise _refused_declaration(obj, exc) from exc
            _must_exist(conn, obj)
            only_checked.append(str(obj))
    for queue, exchange, key in _bindings(topo):
        if only_checked:  # binding needs write on the queue: the administrator's job
            only_checked.append(f"binding {exchange} -> {queue} ({key})")
        else:
            _on_fresh_channel(conn, partial(_bind, queue=queue, exchange=exchange, key=key))
    if not only_checked:
        for queue, exchange, key in _retired(topo):
            _on_fresh_channel(conn, partial(_unbind, queue=queue, exchange=exchange, key=key))
    if only_checked:
        log.info(
            "this broker user may not configure: checked that the exchanges and queues exist"
            " instead; bindings are left to the administrator"
        )
    return only_checked


def _must_exist(conn: Any, obj: _Object) -> None:
    """A passive declare (which needs no permission) of ``obj`` must pass."""
    try:
        _on_fresh_channel(conn, obj.exists)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise TopologyMissing(
            f"{obj}: {_reason(exc)}, and this broker user may not declare it (ACCESS_REFUSED):"
            " an administrator declares the topology (`exitpipe topology`)"
        ) from exc


class TopologyMissing(BrokerError):
    """An object is missing and this broker user may not declare it: wait for the admin."""


def _refused_declaration(obj: _Object, exc: pika.exceptions.ChannelClosedByBroker) -> BrokerError:
    if exc.reply_code == 406:
        return TopologyMismatch(
            f"{obj}: exists with other arguments ({exc.reply_text});"
            " see `exitpipe topology --check`"
        )
    return BrokerError(f"{obj}: the broker refused the declaration ({exc.reply_text})")


def _check(conn: Any, topo: Topology) -> list[str]:
    problems: list[str] = []
    trouble: dict[str, str] = {}  # name -> what is wrong with it
    for obj in _objects(topo):
        problem = _probe(conn, obj)
        if problem is not None:
            trouble[obj.name] = problem
            problems.append(f"{obj}: {problem}")
    for queue, exchange, key in _bindings(topo):
        if exchange in trouble or queue in trouble:
            missing = "missing" in (trouble.get(exchange), trouble.get(queue))
            verdict = "missing" if missing else "not checked, as an end is declared differently"
            problems.append(f"binding {exchange} -> {queue} ({key}): {verdict}")
        else:
            _on_fresh_channel(conn, partial(_bind, queue=queue, exchange=exchange, key=key))
    return problems


def _probe(conn: Any, obj: _Object) -> str | None:
    """What is wrong with one exchange or queue, ``None`` when nothing is."""
    for step in (obj.exists, obj.declare):
        try:
            _on_fresh_channel(conn, step)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return _reason(exc)
    return None


def _reason(exc: pika.exceptions.ChannelClosedByBroker) -> str:
    if exc.reply_code == 404:
        return "missing"
    if exc.reply_code == 406:
        return f"declared differently ({exc.reply_text})"
    return str(exc.reply_text)


def _exchange(channel: Channel, exchange: Exchange) -> None:
    channel.exchange_declare(exchange.name, exchange_type=exchange.kind, durable=True)


def _exchange_exists(name: str, channel: Channel) -> None:
    channel.exchange_declare(name, passive=True)


def _queue(channel: Channel, queue: Queue) -> None:
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)


def _queue_exists(name: str, channel: Channel) -> None:
    channel.queue_declare(name, passive=True)


def _bind(channel: Channel, queue: str, exchange: str, key: str) -> None:
    channel.queue_bind(queue, exchange, routing_key=key)


def _unbind(channel: Channel, queue: str, exchange: str, key: str) -> None:
    channel.queue_unbind(queue, exchange, routing_key=key)


def _on_fresh_channel(conn: Any, step: Callable[[Channel], object]) -> None:
    channel = conn.channel()
    step(channel)
    channel.close()


def _weather(exc: BaseException) -> bool:
    """Connection trouble is retried; a refused login and channel errors are not."""
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and not login_refused(exc)


def _with_connection(
    url: str,
    work: Callable[[Any], T],
    retry_seconds: float,
    connect_timeout: float,
    ca_file: Path | str | None,
) -> T:
    """Run ``work`` on a fresh connection, retrying the whole of it on connection trouble.

    With several nodes, each is tried in turn; a quorum queue declared here gets its leader
    on the node connected to (RabbitMQ's ``client-local`` leader locator).
    """
    params = Nodes(url, connect_timeout=connect_timeout, ca_file=ca_file).parameters

    def out_of_budget(state: RetryCallState) -> bool:
        return (state.seconds_since_start or 0.0) + state.upcoming_sleep > retry_seconds

    def say(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        why = describe(error) if error else "?"
        log.warning("broker %s: %s; retrying in %.2fs", redact(url), why, state.upcoming_sleep)

    retrying = Retrying(
        retry=retry_if_exception(_weather),
        stop=out_of_budget,
        wait=BACKOFF,
        before_sleep=say,
        reraise=True,
    )
    try:
        result: T = retrying(_connected, params, work)
        return result
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnreachable(f"broker {redact(url)} unreachable: {describe(exc)}") from exc
    except pika.exceptions.AMQPChannelError as exc:
        raise BrokerError(f"broker {redact(url)}: {describe(exc)}") from exc


def _connected(params: Any, work: Callable[[Any], T]) -> T:
    conn = connect_blocking(params)
    try:
        return work(conn)
    finally:
        if conn.is_open:
            conn.close()
