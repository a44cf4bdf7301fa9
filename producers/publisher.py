"""The publish adapter: pika ``SelectConnection`` with many publisher confirms in flight.

Every message is persistent, ``mandatory`` and carries its ``message_id`` (the event id), so
the broker tells us for each one whether it was stored (ack), refused (nack) or had nowhere
to go (basic.return, then ack). It also carries ``user_id``, the URL's user name: the
broker refuses a ``user_id`` other than the login's, so consumers know who sent it.

Waiting for each confirm in turn caps a publisher at one round trip per message; instead up
to ``window`` messages are in flight, and each confirm (often ``multiple``) lets more go.

The connection is driven from the caller's thread, only while ``publish`` runs, and kept open
between calls. Heartbeats are therefore serviced only during ``publish``: a connection left
idle past two heartbeats is closed by the broker and is reopened lazily by the next call.

Failures, and what is retried (the only retries of the producers, with tenacity):

- the connection could not be made or was lost: the messages whose confirm had not arrived
  are INDETERMINATE and are sent again, same ``message_id``, on the next connection
  (downstream dedupes by event id). Backoff is exponential with jitter; the budget is
  ``retry_seconds`` without any confirm, after which ``BrokerUnreachable`` is raised carrying
  every message's outcome so far (the unsettled ones INDETERMINATE).
- with several nodes (``producers.connection``), each connection tries them in turn, starting
  with the one that worked last, and a lost or silent node (no confirm for a share of
  ``retry_seconds``, at most ``STALL_SECONDS``) sends the next attempt to the next node: the
  budget runs out only when no node answers.
- a nack: the message is sent again after a pause, ``nack_retries`` times, then NACKED.
- a return: RETURNED at once, never retried (no queue is bound: a topology problem).
- publishing to an exchange that does not exist makes the broker close the channel (404):
  the messages for that exchange are RETURNED too, the others are sent again.
- never retried: login or vhost refused (``BrokerUnreachable``), any other channel closed by
  the broker (``PublishRefused``): configuration or bugs, not weather.

A ``Publisher`` is not thread-safe: use one per thread.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pika
import pika.exceptions
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from producers.connection import LOGIN_REFUSED as LOGIN_REFUSED
from producers.connection import Nodes, OneWriteConnection, login_refused
from producers.errors import BrokerError, BrokerUnreachable, PublishRefused, Unroutable, redact
from schemas.events import Event
from schemas.topology import Names, route

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1000
NACK_RETRIES = 3
STALL_SECONDS = 5.0  # with several nodes: no confirm for this long, try another node
JSON = "application/json"
PERSISTENT = 2
# Exponential backoff with jitter, shared with the topology adapter.
BACKOFF = wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.2)
_NO_EXCHANGE = re.compile(r"no exchange '(?P<name>.*)' in vhost")


@dataclass(frozen=True)
class Outgoing:
    """One message to publish. ``headers`` and ``content_type`` serve republished bodies."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    content_type: str | None = JSON
    headers: Mapping[str, Any] | None = None


class Outcome(enum.Enum):
    """What became of one published message."""

    CONFIRMED = "confirmed"  # the broker stored it in every queue it was routed to
    NACKED = "nacked"  # the broker refused it, retries included
    RETURNED = "returned"  # no queue is bound for its route (or its exchange is missing)
    INDETERMINATE = "indeterminate"  # no confirm before the connection died: send it again


def outgoing(names: Names, event: Event) -> Outgoing:
    """The message that carries ``event``: its route, its JSON body, its id."""
    exchange, routing_key = route(names, event)
    return Outgoing(exchange, routing_key, event.to_json(), str(event.event_id))


def problem(message: Outgoing, outcome: Outcome) -> BrokerError | None:
    """The error an unconfirmed outcome means for ``message``, ``None`` when confirmed."""
    if outcome is Outcome.CONFIRMED:
        return None
    if outcome is Outcome.RETURNED:
        return Unroutable(message.exchange, message.routing_key, message.message_id)
    if outcome is Outcome.NACKED:
        return PublishRefused(f"the broker nacked message {message.message_id}")
    return BrokerUnreachable(f"no confirm arrived for message {message.message_id}")


def publish_event(publisher: Publisher, names: Names, event: Event) -> None:
    """Publish one event and wait for its confirm; raise the BrokerError of any other end."""
    message = outgoing(names, event)
    error = problem(message, publisher.publish([message])[0])
    if error is not None:
        raise error


def publish_events(publisher: Publisher, names: Names, events: Sequence[Event]) -> None:
    """Publish events with their confirms; raise the BrokerError of the first one not stored."""
    messages = [outgoing(names, event) for event in events]
    for message, outcome in zip(messages, publisher.publish(messages), strict=True):
        error = problem(message, outcome)
        if error is not None:
            raise error


def connection_parameters(
    url: str,
    *,
    heartbeat: int = 30,
    connect_timeout: float = 5.0,
    ca_file: Path | str | None = None,
) -> pika.URLParameters:
    """pika parameters for the first node of ``url`` (one URL or a list). A connection that
    should fail over takes ``producers.connection.Nodes`` instead; a bad URL is a BrokerError."""
    return Nodes(url, heartbeat=heartbeat, connect_timeout=connect_timeout, ca_file=ca_file).current


class _Failure(Exception):
    """Why a link cannot go on; ``cause`` is the pika error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Lost(_Failure):
    """The link died or went silent: weather, retried."""


class _Refused(_Failure):
    """The broker refused us on purpose: configuration or a bug, never retried."""


class _Again(Exception):
    """Some messages were nacked and wait to be sent again after a pause."""


class _Batch:
    """The messages of one ``publish`` call: their outcomes and what is left to send."""

    def __init__(self, messages: Sequence[Outgoing], nack_retries: int) -> None:
        self.messages = messages
        self.outcomes = [Outcome.INDETERMINATE] * len(messages)
        self.todo: deque[int] = deque(range(len(messages)))
        self.later: list[int] = []
        self.timestamp = int(time.time())
        self.last_progress = time.monotonic()
        self._nacks = [0] * len(messages)
        self._nack_retries = nack_retries

    def settle(self, index: int, outcome: Outcome) -> None:
        """Record a confirm, a nack or a return for message ``index``."""
        self.last_progress = time.monotonic()
        if outcome is Outcome.NACKED and self._nacks[index] < self._nack_retries:
            self._nacks[index] += 1
            self.later.append(index)
            return
        self.outcomes[index] = outcome

    def resend(self, indexes: Sequence[int]) -> None:
        """Put messages back in front of the queue, in their original order."""
        self.todo = deque(sorted([*indexes, *self.todo]))

    def give_up_nacked(self) -> None:
        """The nacked messages waiting for another try are NACKED for good."""
        for index in self.later:
            self.outcomes[index] = Outcome.NACKED
        self.later.clear()

    def drop_exchange(self, exchange: str, indexes: Sequence[int]) -> list[int]:
        """RETURN every unsent message for a missing ``exchange``; the others of ``indexes``."""
        keep = []
        for index in [*indexes, *self.todo]:
            if self.messages[index].exchange == exchange:
                self.settle(index, Outcome.RETURNED)
            else:
                keep.append(index)
        self.todo.clear()
        return keep


class _Link:
    """One SelectConnection and its confirm-mode channel, driven by ``_run`` when needed."""

    def __init__(self, params: pika.URLParameters, window: int) -> None:
        self.ready = False
        self.error: BaseException | None = None
        self._window = window
        # The login, which the broker checks user_id against (none for EXTERNAL auth).
        self._user_id: str | None = getattr(params.credentials, "username", None) or None
        self._channel: Any = None
        self._batch: _Batch | None = None
        self._inflight: OrderedDict[int, int] = OrderedDict()  # delivery tag -> batch index
        self._returned: Counter[tuple[str, str, str]] = Counter()
        self._tag = 0
        self._until: Callable[[], bool] | None = None
        self._timer: Any = None
        self._conn = OneWriteConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
        )

    @property
    def usable(self) -> bool:
        """Open, in confirm mode, and not known to be dead."""
        return self.ready and self.error is None and bool(self._conn.is_open)

    def open(self, timeout: float) -> None:
        """Connect and put a channel in confirm mode; raise _Lost or _Refused."""
        deadline = time.monotonic() + timeout
        try:
            self._run(lambda: self.ready, lambda: deadline)
        except (ValueError, OSError) as exc:  # pika lets a reset while connecting escape
            self.error = self.error or exc
        if not self.usable:
            raise _failure(self.error or TimeoutError(f"no connection within {timeout:.1f}s"))

    def send(self, batch: _Batch, stall: float) -> None:
        """Publish ``batch.todo`` with a window of confirms; return when all are settled."""
        self._batch = batch
        self._returned.clear()
        started = time.monotonic()  # a stall counts on this link, not since an earlier one
        self._fill()
        self._run(
            lambda: not (self._inflight or batch.todo),
            lambda: max(batch.last_progress, started) + stall,
        )
        if self.error is None and (self._inflight or batch.todo):
            self.error = TimeoutError(f"no confirm arrived for {stall:.1f}s")
        if self.error is not None:
            batch.resend(list(self._inflight.values()))
            self._inflight.clear()
            raise _failure(self.error)

    def close(self) -> None:
        """Close the connection politely, or cut it if the broker does not answer in time."""
        conn = self._conn
        try:
            if not (conn.is_closed or conn.is_closing):
                conn.close()
            deadline = time.monotonic() + 1.0
            self._run(lambda: bool(conn.is_closed), lambda: deadline, stop_on_error=False)
            if not conn.is_closed:
                # A silent peer never sends Close-Ok; pika has no timeout for it, so end the
                # stream the way pika itself aborts an opening connection.
                conn._terminate_stream(TimeoutError("close timed out"))
                deadline = time.monotonic() + 0.5
                self._run(lambda: bool(conn.is_closed), lambda: deadline, stop_on_error=False)
        finally:
            conn.ioloop.close()

    def _run(
        self, until: Callable[[], bool], deadline: Callable[[], float], stop_on_error: bool = True
    ) -> None:
        """Drive the ioloop until ``until()``, an error, or ``deadline()`` passes."""
        done: Callable[[], bool] = until
        if stop_on_error:
            done = lambda: self.error is not None or until()  # noqa: E731
        if done():
            return
        ioloop = self._conn.ioloop
        self._until = done

        def watchdog() -> None:
            left = deadline() - time.monotonic()
            if left > 0:
                self._timer = ioloop.call_later(left, watchdog)
            else:
                ioloop.stop()

        self._timer = ioloop.call_later(max(0.0, deadline() - time.monotonic()), watchdog)
        try:
            ioloop.start()
        finally:
            ioloop.remove_timeout(self._timer)
            self._until = None

    def _poke(self) -> None:
        if self._until is not None and self._until():
            self._conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        self.ready = True
        self._poke()

    def _on_failed(self, _conn: Any, error: BaseException) -> None:
        self.error = self.error or error
        self._poke()

    def _on_channel_closed(self, _channel: Any, error: BaseException) -> None:
        if isinstance(error, pika.exceptions.ChannelClosedByBroker) and self._missing(error):
            return
        self._on_failed(None, error)

    def _missing(self, error: pika.exceptions.ChannelClosedByBroker) -> bool:
        """A 404 for a missing exchange: its messages are RETURNED, the rest go again."""
        match = _NO_EXCHANGE.search(str(error.reply_text))
        if error.reply_code != 404 or match is None or self._batch is None:
            return False
        keep = self._batch.drop_exchange(match["name"], list(self._inflight.values()))
        self._inflight.clear()
        self._batch.resend(keep)
        gone = f"exchange {match['name']} does not exist: its messages are returned, others resent"
        self._on_failed(None, pika.exceptions.ChannelClosed(404, gone))
        return True

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        # A basic.return always precedes the ack of the same message on its channel.
        self._returned[(method.exchange, method.routing_key, props.message_id or "")] += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        for tag in self._settled_tags(method.delivery_tag, method.multiple):
            index = self._inflight.pop(tag)
            assert self._batch is not None
            self._batch.settle(index, self._outcome(self._batch.messages[index], acked))
        self._fill()
        self._poke()

    def _settled_tags(self, tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [tag] if tag in self._inflight else []
        tags = []
        for pending in self._inflight:  # insertion order is ascending tag order
            if pending > tag:
                break
            tags.append(pending)
        return tags

    def _outcome(self, message: Outgoing, acked: bool) -> Outcome:
        key = (message.exchange, message.routing_key, message.message_id)
        returned = self._returned[key] > 0
        if returned:
            self._returned[key] -= 1
        if not acked:
            return Outcome.NACKED
        return Outcome.RETURNED if returned else Outcome.CONFIRMED

    def _fill(self) -> None:
        """Publish from the batch while the window has room."""
        batch = self._batch
        while batch is not None and batch.todo and len(self._inflight) < self._window:
            if self.error is not None:
                return
            index = batch.todo.popleft()
            self._tag += 1
            self._inflight[self._tag] = index  # before publishing: a failure resends it
            self._publish(batch.messages[index], batch.timestamp)

    def _publish(self, message: Outgoing, timestamp: int) -> None:
        properties = pika.BasicProperties(
            content_type=message.content_type,
            delivery_mode=PERSISTENT,
            message_id=message.message_id,
            timestamp=timestamp,
            user_id=self._user_id,
            headers=dict(message.headers) if message.headers else None,
        )
        try:
            self._channel.basic_publish(
                message.exchange, message.routing_key, message.body, properties, mandatory=True
            )
        except pika.exceptions.AMQPError as exc:
            self._on_failed(None, exc)


def _failure(error: BaseException) -> _Failure:
    """Weather (_Lost) or a refusal (_Refused) for a pika error."""
    refused = login_refused(error) or isinstance(error, pika.exceptions.ChannelClosedByBroker)
    return _Refused(error) if refused else _Lost(error)


class Publisher:
    """Publishes batches of messages with confirms; see the module docstring for retries.

    ``window``: confirms in flight at most; ``retry_seconds``: how long a publish goes on
    without any confirm before it gives up; ``connect_timeout``: one connection attempt;
    ``nack_retries``: how often a nacked message is sent again. No I/O until ``publish``.
    """

    def __init__(
        self,
        url: str,
        *,
        heartbeat: int = 30,
        window: int = DEFAULT_WINDOW,
        retry_seconds: float = 30.0,
        connect_timeout: float = 5.0,
        nack_retries: int = NACK_RETRIES,
        ca_file: Path | str | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._nodes = Nodes(
            url, heartbeat=heartbeat, connect_timeout=connect_timeout, ca_file=ca_file
        )
        self._stall = _stall(retry_seconds, connect_timeout, len(self._nodes))
        self._failed = self._nodes.url  # the node of the last failure, for the log
        self._window = window
        self._retry_seconds = retry_seconds
        self._connect_timeout = connect_timeout
        self._nack_retries = nack_retries
        self._link: _Link | None = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def publish(self, messages: Sequence[Outgoing]) -> list[Outcome]:
        """Publish ``messages``; one outcome each, in order (never INDETERMINATE on return).

        Raises ``BrokerUnreachable`` when the retry budget runs out and ``PublishRefused`` when
        the broker closes the channel; both carry ``outcomes`` for every message so far.
        """
        batch = _Batch(messages, self._nack_retries)
        try:
            self._retrying(batch)(self._attempt, batch)
        except _Again:
            batch.give_up_nacked()
        except _Refused as exc:
            self._drop()
            raise _refusal(exc.cause, self._nodes.url, batch.outcomes) from exc.cause
        except _Lost as exc:
            self._drop()
            raise BrokerUnreachable(
                f"broker {self._nodes} unreachable: {describe(exc.cause)}",
                batch.outcomes,
            ) from exc.cause
        except BaseException:
            self._drop()
            raise
        return batch.outcomes

    def close(self) -> None:
        """Close the connection, if any; a later ``publish`` opens a new one."""
        self._drop()

    def _retrying(self, batch: _Batch) -> Retrying:
        def out_of_budget(state: RetryCallState) -> bool:
            resume = time.monotonic() + state.upcoming_sleep
            return resume - batch.last_progress > self._retry_seconds

        return Retrying(
            retry=retry_if_exception_type((_Again, _Lost)),
            stop=out_of_budget,
            wait=BACKOFF,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _attempt(self, batch: _Batch) -> None:
        batch.resend(batch.later)
        batch.later.clear()
        if not batch.todo:
            return
        link = self._connected()
        try:
            link.send(batch, self._stall)
        except _Lost:
            self._failed = self._nodes.url
            self._nodes.advance()  # the next attempt goes to the next node
            raise
        if batch.later:
            raise _Again()

    def _connected(self) -> _Link:
        if self._link is not None and self._link.usable:
            return self._link
        self._drop()
        lost: _Lost | None = None
        for _ in range(len(self._nodes)):  # each node in turn, the one that worked last first
            link = _Link(self._nodes.current, self._window)
            try:
                link.open(self._connect_timeout + 1.0)
            except _Lost as exc:
                _close(link)
                if len(self._nodes) > 1:
                    log.warning("broker node %s: %s", self._nodes.url, describe(exc.cause))
                self._failed = self._nodes.url
                self._nodes.advance()
                lost = exc
                continue
            except BaseException:
                _close(link)
                raise
            self._link = link
            return link
        assert lost is not None
        raise lost

    def _drop(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            _close(link)

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        why = describe(error.cause) if isinstance(error, _Failure) else "nacked, sending again"
        log.warning("publish to %s: %s; retrying in %.2fs", self._failed, why, state.upcoming_sleep)


def _stall(retry_seconds: float, connect_timeout: float, nodes: int) -> float:
    """How long a connection may go without any confirm before the publisher tries another.

    With one node, the whole budget. With several, a node that went silent (frozen, cut off)
    sends no confirm and no close, and RabbitMQ 3.10 holds the confirms of messages sent to a
    quorum queue whose leader froze until that leader comes back, even after the others have
    elected a new one: a new connection, on another node, finds the new leader. So a share of
    the budget, and never more than ``STALL_SECONDS``.
    """
    if nodes == 1:
        return retry_seconds
    return max(connect_timeout, min(retry_seconds / nodes, STALL_SECONDS))


def _close(link: _Link) -> None:
    try:
        link.close()
    except Exception:  # a dying connection may fail to close: nothing left to save
        log.debug("closing a dead connection failed", exc_info=True)


def _refusal(cause: BaseException, url: str, outcomes: Sequence[Outcome]) -> BrokerError:
    text = describe(cause)
    if login_refused(cause):
        return BrokerUnreachable(f"broker {redact(url)} refused login or vhost: {text}", outcomes)
    return PublishRefused(f"broker {redact(url)} closed the channel: {text}", outcomes)


def describe(error: BaseException) -> str:
    """A pika error in one line, from its innermost cause (many print as an empty string)."""
    inner = _inner(error)
    if inner is not None:
        return describe(inner)
    return str(error) or repr(error)


def _inner(error: BaseException) -> BaseException | None:
    nested = getattr(error, "exceptions", None)  # a failed connection workflow
    if nested:
        return nested[-1]  # type: ignore[no-any-return]
    wrapped = getattr(error, "exception", None)  # a failed connector phase
    if isinstance(wrapped, BaseException):
        return wrapped
    if error.args and isinstance(error.args[0], BaseException):
        return error.args[0]
    return None
