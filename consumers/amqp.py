"""The consume adapter: one connection, one channel, one queue, and nothing else talks AMQP.

Handlers decide, the adapter acts. A handler looks at a ``Delivery`` and returns an action
(``Ack``, ``Forward``, ``DeadLetter``, ``Requeue``), or returns None and settles later from
any thread through ``Consumer.settle`` (the job-state consumer commits in a worker thread so
the I/O loop keeps heartbeats going while the database works).

Speed comes from never waiting on the wire: forwards and dead letters are published with
many confirms in flight, and inputs are acked in delivery order with ``multiple=True`` up to
the highest tag whose own work is done (the watermark), at most once per loop turn.

A lost connection drops every unsettled delivery (the broker redelivers them; the store's
inbox makes the second application a no-op), and the consumer reconnects with tenacity's
exponential backoff until it is stopped. With several broker nodes (``producers.connection``)
each reconnect goes to the next node, at once while a node of the round is still untried.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from consumers.observe import DEAD_LETTERED, LOOP_ERRORS
from producers.connection import Nodes, OneWriteConnection, each_node_first
from schemas.topology import ERROR_HEADER, SENDER_HEADER, SOURCE_HEADER

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as received; ``generation`` names the channel it came on."""

    tag: int
    body: bytes
    properties: BasicProperties
    routing_key: str
    redelivered: bool
    generation: int
    received: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class Ack:
    """Done: acknowledge the input."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Publish this (with a confirm), then acknowledge the input."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Bad input: republish the original to the dead-letter exchange with the reason, then ack.

    ``sender`` is who the handler found had sent it (``consumers.senders``), kept in the dead
    letter so that ``dead requeue`` can send it back as that sender's.
    """

    reason: str
    sender: str | None = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Give the input back to the broker (counts against the delivery limit)."""


Action = Ack | Forward | DeadLetter | Requeue
ACK = Ack()


def dead_letter(
    daemon: str, delivery: Delivery, reason: str, sender: str | None = None
) -> DeadLetter:
    """The action for bad input, logged with its reason and counted."""
    log.warning(
        "%s: dead-letter message_id=%s reason=%s",
        daemon,
        delivery.properties.message_id,
        reason,
        extra={"fields": {"event_id": delivery.properties.message_id, "error": reason}},
    )
    DEAD_LETTERED.labels(daemon).inc()
    return DeadLetter(reason, sender)


class Handler(Protocol):
    """Decides what to do with each delivery; returns None to settle later."""

    def handle(self, delivery: Delivery) -> Action | None: ...


@dataclass(frozen=True)
class ConsumerConfig:
    """Where and how to consume."""

    url: str
    queue: str
    dead_exchange: str
    prefetch: int = 500
    heartbeat: int = 30
    stop_grace: float = 20.0
    name: str = "consumer"
    ca_file: Path | None = None


class ConnectionLost(Exception):
    """The broker could not be reached, or the connection dropped before it was consuming."""


_PERSISTENT = 2


class Consumer:
    """Consumes one queue until ``stop()``; reconnects on its own."""

    def __init__(
        self,
        config: ConsumerConfig,
        handler: Handler,
        *,
        on_settled: Callable[[Delivery, Action], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self._on_settled = on_settled or (lambda d, a: None)
        self._on_reconnect = on_reconnect or (lambda: None)
        self._stop_requested = threading.Event()
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._generation = 0
        self._consuming = False
        self._stopping = False  # declared here for the type checker; reset per channel
        self._user_id: str | None = None
        self._nodes: Nodes | None = None
        self._reset_channel_state()

    # -- public, any thread --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the channel is open and consuming (the health endpoint's answer)."""
        return self._consuming

    def run(self) -> None:
        """Consume until stopped; reconnect with backoff whenever the connection goes away."""
        nodes = self._node_list()
        while not self._stop_requested.is_set():
            retrying = Retrying(
                retry=retry_if_exception_type(ConnectionLost),
                wait=each_node_first(nodes, wait_exponential_jitter(multiplier=0.2, max=5.0)),
                sleep=self._pause,
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                retrying(self._run_connection)
            except ConnectionLost:  # only when stopped during a backoff sleep
                return
            if not self._stop_requested.is_set():
                self._on_reconnect()

    def _node_list(self) -> Nodes:
        if self._nodes is None:
            c = self.config
            self._nodes = Nodes(c.url, heartbeat=c.heartbeat, ca_file=c.ca_file)
            for params in self._nodes.parameters:
                params.blocked_connection_timeout = max(30, 3 * c.heartbeat)
        return self._nodes

    @property
    def _node(self) -> str:
        """The node connected to (or tried), redacted, for log lines."""
        return self._nodes.url if self._nodes is not None else "?"

    def _pause(self, seconds: float) -> None:
        self._stop_requested.wait(seconds)  # a stop cuts the backoff short

    def stop(self) -> None:
        """Stop consuming, finish what is in hand, close. Safe from signal handlers."""
        self._stop_requested.set()
        conn = self._connection
        if conn is not None:
            with contextlib.suppress(Exception):  # the loop is already gone
                conn.ioloop.add_callback_threadsafe(self._begin_stop)

    def settle(self, items: Sequence[tuple[Delivery, Action]]) -> None:
        """Settle deliveries from any thread (the job-state worker calls this after commit)."""
        conn = self._connection
        if conn is None:
            return
        try:
            conn.ioloop.add_callback_threadsafe(lambda: self._settle_many(items))
        except Exception:  # connection closed meanwhile; the broker will redeliver
            log.debug("settle after close dropped %d deliveries", len(items))

    # -- connection lifecycle (I/O loop thread) --------------------------------------------

    def _run_connection(self) -> None:
        """One connection, from open to close; raises ConnectionLost if it never consumed."""
        if self._stop_requested.is_set():
            return
        nodes = self._node_list()
        params = nodes.current
        # The login, which the broker checks a dead letter's user_id against.
        self._user_id = getattr(params.credentials, "username", None) or None
        self._ever_consumed = False
        self._connection = OneWriteConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
        )
        try:
            self._loop(self._connection)
        finally:
            self._consuming = False
            self._connection = None
            self._channel = None
        if self._stop_requested.is_set():
            return
        node = nodes.url
        nodes.advance()  # this node failed or went away: the next attempt goes to the next
        if not self._ever_consumed:
            raise ConnectionLost(f"{self.config.name}: could not start consuming on {node}")

    def _loop(self, conn: SelectConnection) -> None:
        """Run the I/O loop until the connection closes, surviving anything raised in it.

        An exception that escapes a callback (a bug, or pika refusing an operation on a channel
        the broker has just closed) would end the loop with the connection half open and the
        deliveries in hand unsettled. It is logged and counted, the connection is torn down
        (the broker redelivers what was unsettled), and ``run`` connects again.
        """
        while True:
            try:
                conn.ioloop.start()
                return
            except Exception as exc:
                log.exception("%s: error in the I/O loop; reconnecting", self.config.name)
                LOOP_ERRORS.labels(self.config.name).inc()
                self._consuming = False
                if conn.is_closed:
                    return
                # Closes the socket and runs the close callbacks, which stop the loop; the
                # next turn of this loop lets that happen.
                conn._terminate_stream(ConnectionLost(f"error in the I/O loop: {exc!r}"))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: broker unavailable (%s); retry %d in %.1fs",
            self.config.name,
            exc,
            state.attempt_number,
            state.upcoming_sleep,
        )

    def _on_connection_open(self, conn: SelectConnection) -> None:
        self._watch_broker(conn, conn.bytes_received, time.monotonic())
        conn.channel(on_open_callback=self._on_channel_open)

    def _watch_broker(self, conn: SelectConnection, seen: int, since: float) -> None:
        # The broker sends a heartbeat every heartbeat/2 s, but pika only checks every
        # heartbeat + 5 s and gives up after two silent checks (14 s for a 2 s heartbeat).
        # A silent link (a blackholed network) is declared dead after 2 heartbeats instead.
        if id(conn) != id(self._connection) or conn.is_closing or conn.is_closed:
            return  # a newer connection has its own watch
        now = time.monotonic()
        if conn.bytes_received != seen:
            seen, since = conn.bytes_received, now
        elif now - since > 2 * self.config.heartbeat:
            silent = now - since
            log.warning("%s: nothing from the broker for %.1fs: dead", self.config.name, silent)
            conn._terminate_stream(ConnectionLost("broker silent past 2 heartbeats"))
            return
        conn.ioloop.call_later(
            self.config.heartbeat / 4, lambda: self._watch_broker(conn, seen, since)
        )

    def _on_connection_open_error(self, conn: SelectConnection, err: BaseException) -> None:
        log.warning("%s: cannot connect to %s: %s", self.config.name, self._node, _describe(err))
        conn.ioloop.stop()

    def _on_connection_closed(self, conn: SelectConnection, reason: BaseException) -> None:
        if not self._stop_requested.is_set():
            log.warning(
                "%s: connection to %s closed: %s", self.config.name, self._node, _describe(reason)
            )
        conn.ioloop.stop()

    def _on_channel_open(self, channel: Channel) -> None:
        self._generation += 1
        self._reset_channel_state()
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_broker_cancel)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        assert self._channel is not None
        self._channel.basic_qos(prefetch_count=self.config.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Any) -> None:
        assert self._channel is not None
        if self._stop_requested.is_set():
            self._close()
            return
        self._channel.basic_consume(
            self.config.queue, self._on_message, auto_ack=False, callback=self._on_consume_ok
        )

    def _on_consume_ok(self, _frame: Any) -> None:
        # Only a confirmed consume counts as connected: a refused one (403, 404) closes the
        # channel first, and the reconnect then backs off instead of spinning.
        self._consuming = self._ever_consumed = True
        log.info("%s: consuming %s on %s", self.config.name, self.config.queue, self._node)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        self._consuming = False
        if not self._stop_requested.is_set():
            log.warning("%s: channel closed: %s", self.config.name, _describe(reason))
        conn = self._connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    def _on_broker_cancel(self, _frame: Any) -> None:
        log.warning("%s: the broker cancelled the consumer (queue deleted?)", self.config.name)
        if self._channel is not None and self._channel.is_open:
            self._channel.close()

    # -- stopping ---------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        # No basic.cancel: RabbitMQ 3.10's quorum queues return a cancelled consumer's
        # unacked messages at once and ignore later acks for them, so every message in hand
        # would be redelivered (and applied again as a duplicate). Instead, stop handling new
        # deliveries, finish and ack what is in hand, then close: only the deliveries never
        # handled go back to the queue (their delivery count goes up by one).
        channel = self._channel
        if channel is None or not channel.is_open or self._stopping:
            return
        self._stopping = True
        self._maybe_close()
        conn = self._connection
        if conn is not None:
            conn.ioloop.call_later(self.config.stop_grace, self._close)

    def _maybe_close(self) -> None:
        if self._stopping and not self._unsettled:
            self._close()

    def _close(self) -> None:
        conn = self._connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            if self._unsettled:
                log.warning(
                    "%s: closing with %d deliveries unsettled (the broker will redeliver)",
                    self.config.name,
                    len(self._unsettled),
                )
            conn.close()

    # -- messages -------------------------------------------------------------------------

    def _reset_channel_state(self) -> None:
        self._unsettled: OrderedDict[int, bool] = OrderedDict()  # delivery tag -> done
        self._confirms: OrderedDict[int, tuple[Delivery, Forward | DeadLetter]] = OrderedDict()
        self._returned: set[str | None] = set()
        self._publish_seq = 0
        self._flush_scheduled = False
        self._stopping = False

    def _on_message(
        self, _ch: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if self._stopping:
            return  # left unacked: the broker takes it back when the channel closes
        delivery = Delivery(
            method.delivery_tag,
            body,
            props,
            method.routing_key,
            method.redelivered,
            self._generation,
        )
        self._unsettled[delivery.tag] = False
        try:
            action = self.handler.handle(delivery)
        except Exception:  # a bug: keep the daemon up, let the broker's delivery limit decide
            log.exception("%s: handler failed on delivery %d", self.config.name, delivery.tag)
            action = Requeue()
        if action is not None:
            self._settle(delivery, action)

    def _settle_many(self, items: Sequence[tuple[Delivery, Action]]) -> None:
        for delivery, action in items:
            self._settle(delivery, action)

    def _settle(self, delivery: Delivery, action: Action) -> None:
        if delivery.generation != self._generation or delivery.tag not in self._unsettled:
            return  # from a channel that is gone: the broker redelivers it
        if isinstance(action, Ack):
            self._done(delivery, action)
        elif isinstance(action, Requeue):
            self._requeue(delivery)
        else:
            self._publish(delivery, action)

    def _channel_open(self) -> bool:
        channel = self._channel
        return channel is not None and channel.is_open

    def _publish(self, delivery: Delivery, action: Forward | DeadLetter) -> None:
        if not self._channel_open():
            return  # the broker redelivers it on the next channel
        assert self._channel is not None
        if isinstance(action, Forward):
            exchange, key, body = action.exchange, action.routing_key, action.body
            props = BasicProperties(
                content_type="application/json",
                delivery_mode=_PERSISTENT,
                message_id=action.message_id,
                timestamp=int(time.time()),
            )
        else:
            exchange, key, body = self.config.dead_exchange, delivery.routing_key, delivery.body
            props = _dead_letter_properties(delivery, action, self.config.queue, self._user_id)
        try:
            self._channel.basic_publish(exchange, key, body, props, mandatory=True)
        except (TypeError, ValueError, UnicodeError, OverflowError, RecursionError, struct.error):
            if isinstance(action, Forward):
                raise
            # The original headers do not encode again (pika reads more than it writes):
            # the dead letter keeps only exitpipe's own headers, so it is still never lost.
            log.warning("%s: dead letter without its original headers", self.config.name)
            props = _dead_letter_properties(
                delivery, action, self.config.queue, self._user_id, keep=False
            )
            self._channel.basic_publish(exchange, key, body, props, mandatory=True)
        self._publish_seq += 1
        self._confirms[self._publish_seq] = (delivery, action)

    def _on_return(
        self, _ch: Channel, method: Basic.Return, props: BasicProperties, _body: bytes
    ) -> None:
        log.error(
            "%s: unroutable publish to %s %s (%s): is the topology declared?",
            self.config.name,
            method.exchange,
            method.routing_key,
            method.reply_text,
        )
        self._returned.add(props.message_id)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        last = method.delivery_tag
        seqs = _up_to(self._confirms, last) if method.multiple else [last]
        for seq in seqs:
            entry = self._confirms.pop(seq, None)
            if entry is None:
                continue
            delivery, action = entry
            message_id = (
                action.message_id if isinstance(action, Forward) else delivery.properties.message_id
            )
            if acked and message_id not in self._returned:
                self._done(delivery, action)
            else:
                log.warning("%s: publish refused; input requeued", self.config.name)
                self._requeue(delivery)
        if not self._confirms:
            self._returned.clear()

    def _done(self, delivery: Delivery, action: Action) -> None:
        if delivery.tag not in self._unsettled:
            return
        self._unsettled[delivery.tag] = True
        self._on_settled(delivery, action)
        self._schedule_flush()

    def _requeue(self, delivery: Delivery) -> None:
        if self._unsettled.pop(delivery.tag, None) is None or not self._channel_open():
            return  # a closed channel gives every unsettled delivery back by itself
        assert self._channel is not None
        self._channel.basic_nack(delivery.tag, multiple=False, requeue=True)
        self._on_settled(delivery, Requeue())
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Always on the I/O loop thread: a zero timer runs after this loop turn's other
        # events, so one ack covers everything settled in the turn, with no wake-up syscall.
        if not self._flush_scheduled and self._connection is not None:
            self._flush_scheduled = True
            self._connection.ioloop.call_later(0, self._flush_acks)

    def _flush_acks(self) -> None:
        """Ack, with one ``multiple=True``, every delivery up to the first one still waiting."""
        self._flush_scheduled = False
        last = None
        while self._unsettled:
            tag, done = next(iter(self._unsettled.items()))
            if not done:
                break
            self._unsettled.popitem(last=False)
            last = tag
        channel = self._channel
        if last is not None and channel is not None and channel.is_open:
            channel.basic_ack(last, multiple=True)
        self._maybe_close()


def _dead_letter_properties(
    delivery: Delivery,
    action: DeadLetter,
    source: str,
    user_id: str | None,
    *,
    keep: bool = True,
) -> BasicProperties:
    """The original properties plus the reason, source and sender headers (DESIGN 3).

    A dead letter stays until an operator acts (DESIGN 3), so the original ``expiration`` is
    left out. ``user_id`` cannot be kept (the broker checks it against the daemon's own login):
    the dead letter carries the daemon's own, and the sender the handler found goes into a
    header, which ``consumers.senders.dead_letter_sender`` believes from a daemon's user.
    """
    p = delivery.properties
    headers = dict(p.headers or {}) if keep else {}
    headers[ERROR_HEADER] = _header_text(action.reason)
    headers[SOURCE_HEADER] = source
    headers[SENDER_HEADER] = action.sender or ""
    return BasicProperties(
        content_type=p.content_type if keep else None,
        content_encoding=p.content_encoding if keep else None,
        headers=headers,
        delivery_mode=_PERSISTENT,
        priority=p.priority,
        correlation_id=p.correlation_id if keep else None,
        reply_to=p.reply_to if keep else None,
        message_id=p.message_id,
        timestamp=p.timestamp,
        type=p.type if keep else None,
        app_id=p.app_id if keep else None,
        user_id=user_id,
    )


def _header_text(reason: str) -> str:
    """At most 4,096 characters of valid UTF-8, whatever the reason quotes."""
    return reason[:4096].encode("utf-8", "backslashreplace").decode("utf-8")


def _up_to(confirms: OrderedDict[int, Any], last: int) -> list[int]:
    """The publish sequence numbers a ``multiple`` confirm of ``last`` covers."""
    seqs = []
    for seq in confirms:
        if seq > last:
            break
        seqs.append(seq)
    return seqs


def _describe(err: BaseException) -> str:
    """An error as one line; pika's messages carry no credentials."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
