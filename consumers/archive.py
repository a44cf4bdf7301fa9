"""The archive adapter: read ``<ns>.archive`` (a stream queue) over AMQP 0-9-1, up to its end.

A stream never ends by itself: a consumer attached to it just waits for the next message. So,
to read "what the archive holds now", ``Archive.read`` first finds the end, then reads up to it:

1. A probe consumer attaches at ``last``. The broker answers with every message of the newest
   chunk, so at least one whenever the stream is not empty; the highest ``x-stream-offset``
   among them, once none has come for ``settle`` seconds, is the end offset. No message within
   ``probe_wait`` seconds means the stream is empty (``idle_timeout`` instead, when the queue's
   message count says it is not).
2. The reading consumer attaches at the chosen start (``first``, ``last``, an offset, a time)
   and stops after the message at the end offset: messages archived after the probe are left
   for the next read (a read is a snapshot).
3. Fallback: nothing for ``idle_timeout`` seconds before the end (a start beyond it, retention
   deleting the segment being read) ends the read too, with a warning.

The queue's message count is no end marker: for a stream, RabbitMQ 3.10 answers a passive
declare from periodically emitted statistics (it can say 25 when 35 are there), and a count
says nothing about offsets once retention has moved the first one.

Why ``SelectConnection`` and not pika's ``BlockingConnection``: a blocking channel, when its
consumer is cancelled or closed, rejects every delivery it holds or still receives, and a
stream answers ``basic.reject`` by closing the whole connection (540 NOT_IMPLEMENTED). The
asynchronous channel closes without rejecting anything, and unacknowledged stream deliveries
are simply forgotten. The connection is driven from the caller's thread, only while it waits
for messages (as ``producers.publisher`` does).

Times: ``--from TIME`` is the broker's (the chunk written at or after it); each message also
carries its publisher's AMQP ``timestamp`` (whole seconds), which bounds the window on our side:
messages stamped before the start second or after ``until`` are left out. Publishers' clocks
may disagree, so reading past ``until`` goes on until a message is stamped ``SKEW`` seconds
later, or the end.

A lost connection is retried (backoff, ``retry_seconds`` without progress in all) and the read
resumes after the last offset delivered. Errors::

    BrokerError (producers.errors)   the broker refused something: a bug or configuration
    +-- BrokerUnreachable            no connection within the retry budget, or login refused
    +-- ArchiveMissing               the namespace has no archive stream
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pika
import pika.exceptions
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from producers.connection import Nodes, each_node_first, login_refused
from producers.errors import BrokerError, BrokerUnreachable, redact
from producers.publisher import describe

log = logging.getLogger(__name__)

Start = Literal["first", "last"] | int | datetime
OFFSET_HEADER = "x-stream-offset"
SKEW = 60  # seconds a publisher's clock may be behind another's
RPC_TIMEOUT = 10.0
CONNECTION_FORCED = 320  # the broker is shutting down or an operator closed us: weather
_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ArchiveMissing(BrokerError):
    """The namespace has no archive stream (wrong namespace, or no topology declared)."""


# -- positions (pure) --------------------------------------------------------------------------


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time with an offset, or a time ago: ``30s``, ``30m``, ``2h``, ``1d``, ``1w``."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        amount, unit = relative.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ValueError(
            f"{text!r} is neither an RFC 3339 time with an offset (2026-01-31T12:00:00Z)"
            " nor a time ago (30m, 2h, 1d)"
        )
    return value


def parse_start(text: str, now: datetime | None = None) -> Start:
    """``first``, ``last``, an offset (a non-negative integer) or a time (see ``parse_time``)."""
    if text == "first":
        return "first"
    if text == "last":
        return "last"
    if text.isdigit():
        return int(text)
    return parse_time(text, now)


@dataclass(frozen=True, slots=True)
class Archived:
    """One archived message: its offset, its publisher's timestamp (seconds) and its body."""

    offset: int
    timestamp: int | None
    routing_key: str
    body: bytes
    user_id: str | None = None
    headers: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Window:
    """Where to start reading and the latest publish time wanted."""

    start: Start = "first"
    until: datetime | None = None


@dataclass(frozen=True)
class _Bounds:
    """Which messages of a read are wanted, and when the read is over."""

    end: int
    low: int = -1  # the first offset wanted (a consumer may start before it, at its chunk)
    since: int | None = None  # whole seconds: AMQP timestamps have no fractions
    until: float | None = None

    @classmethod
    def of(cls, start: Start, until: datetime | None, end: int) -> _Bounds:
        """The bounds of a read from ``start`` to ``until`` that ends at offset ``end``."""
        return cls(
            end=end,
            low=start if isinstance(start, int) else -1,
            since=math.floor(start.timestamp()) if isinstance(start, datetime) else None,
            until=until.timestamp() if until is not None else None,
        )

    def wanted(self, offset: int, stamp: int | None) -> bool:
        """In the window: from the start offset, stamped within the times (or not stamped)."""
        if offset < self.low:
            return False
        if stamp is None:
            return True
        after_start = self.since is None or stamp >= self.since
        return after_start and (self.until is None or stamp <= self.until)

    def past(self, offset: int, stamp: int | None) -> bool:
        """Archived after the probe, or stamped well after ``until``: nothing more is wanted."""
        late = self.until is not None and stamp is not None and stamp > self.until + SKEW
        return offset > self.end or late


def _after_end(start: Start, end: int, newest: int | None) -> bool:
    """True when ``start`` is known to lie past the end, so there is nothing to read."""
    if isinstance(start, int):
        return start > end
    if isinstance(start, datetime) and newest is not None:
        return newest < math.floor(start.timestamp())
    return False


# -- the reader --------------------------------------------------------------------------------


class Archive:
    """Reads one namespace's archive stream; ``end`` is known once a read has begun."""

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        prefetch: int = 1000,
        heartbeat: int = 30,
        retry_seconds: float = 30.0,
        ca_file: Path | str | None = None,
        probe_wait: float = 1.0,
        settle: float = 0.3,
        idle_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.queue = queue
        self.prefetch = prefetch
        self.retry_seconds = retry_seconds
        self.probe_wait = probe_wait
        self.settle = settle
        self.idle_timeout = idle_timeout
        self.end: int | None = None
        self._nodes = Nodes(
            url, heartbeat=heartbeat, ca_file=ca_file, name="exitpipe-archive-reader"
        )

    def read(self, window: Window = Window()) -> Iterator[Archived]:
        """The archived messages of ``window``, in archive order, up to the end found at start."""
        try:
            yield from self._read(window)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise ArchiveMissing(
                    f"no archive stream {self.queue!r} on {redact(self.url)}: wrong namespace,"
                    " or the topology was never declared (`exitpipe topology`)"
                ) from exc
            raise BrokerError(f"reading {self.queue}: {describe(exc)}") from exc
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"reading {self.queue}: {describe(exc)}") from exc

    def _read(self, window: Window) -> Iterator[Archived]:
        link = self._connect()
        try:
            self.end, newest = self._probe(link)
            if self.end is None or _after_end(window.start, self.end, newest):
                return
            start, progress = window.start, time.monotonic()
            while True:
                try:
                    for message in self._consume(link, start, window.until):
                        start, progress = message.offset + 1, time.monotonic()
                        yield message
                    return
                except pika.exceptions.AMQPConnectionError as exc:
                    if not _weather(exc) or time.monotonic() - progress > self.retry_seconds:
                        raise
                    log.warning("archive read interrupted (%s); resuming at %s", exc, start)
                    link.close()
                    link = self._connect()
        finally:
            link.close()

    def _probe(self, link: _Link) -> tuple[int | None, int | None]:
        """(end offset, newest publisher timestamp) of the stream; (None, None) when empty."""
        channel = link.channel()
        declared = link.call(
            lambda done: channel.queue_declare(self.queue, passive=True, callback=done)
        )
        link.call(lambda done: channel.basic_qos(prefetch_count=self.prefetch, callback=done))
        seen: list[tuple[int, int | None]] = []
        arrived = [0.0]

        def on_message(ch: Any, method: Any, props: Any, _body: bytes) -> None:
            seen.append((props.headers[OFFSET_HEADER], props.timestamp))
            arrived[0] = time.monotonic()
            ch.basic_ack(method.delivery_tag)
            link.poke()

        channel.basic_consume(self.queue, on_message, arguments={OFFSET_HEADER: "last"})
        link.wait(
            lambda: bool(seen),
            self.idle_timeout if declared.method.message_count else self.probe_wait,
        )
        while seen and (left := arrived[0] + self.settle - time.monotonic()) > 0:
            link.wait(lambda: False, left)
        channel.close()
        if not seen:
            return None, None
        stamps = [stamp for _, stamp in seen if stamp is not None]
        return max(offset for offset, _ in seen), max(stamps, default=None)

    def _consume(self, link: _Link, start: Start, until: datetime | None) -> Iterator[Archived]:
        assert self.end is not None
        bounds = _Bounds.of(start, until, self.end)
        channel = link.channel()
        link.call(lambda done: channel.basic_qos(prefetch_count=self.prefetch, callback=done))
        inbox: deque[tuple[Any, Any, bytes]] = deque()

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            inbox.append((method, props, body))
            link.poke()

        channel.basic_consume(self.queue, on_message, arguments={OFFSET_HEADER: start})
        ack_every, unacked = max(1, self.prefetch // 2), 0
        try:
            while inbox or link.wait(lambda: bool(inbox), self.idle_timeout):
                method, props, body = inbox.popleft()
                unacked += 1
                if unacked >= ack_every:  # credit for the next messages while we work
                    channel.basic_ack(method.delivery_tag, multiple=True)
                    link.flush()
                    unacked = 0
                offset, stamp = props.headers[OFFSET_HEADER], props.timestamp
                if bounds.past(offset, stamp):
                    return
                if bounds.wanted(offset, stamp):
                    yield Archived(
                        offset, stamp, method.routing_key, body, props.user_id, props.headers
                    )
                if offset == bounds.end:
                    return
            log.warning(
                "no message for %.0fs before offset %d: stopped", self.idle_timeout, self.end
            )
        finally:
            if channel.is_open:
                channel.close()  # no reject: the deliveries still unacked are simply forgotten

    def _connect(self) -> _Link:
        retrying = Retrying(
            retry=retry_if_exception(_weather),
            stop=stop_after_delay(self.retry_seconds),
            wait=each_node_first(
                self._nodes, wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.2)
            ),
            reraise=True,
        )
        try:
            return retrying(self._open)
        except pika.exceptions.AMQPConnectionError as exc:
            raise BrokerUnreachable(
                f"broker {redact(self.url)} unreachable: {describe(exc)}"
            ) from exc

    def _open(self) -> _Link:
        """A link to the current node; on failure the next attempt goes to the next node."""
        try:
            return _Link.open(self._nodes.current)
        except pika.exceptions.AMQPConnectionError:
            self._nodes.advance()
            raise


class _Link:
    """One ``SelectConnection``, driven from the caller's thread only while it waits."""

    def __init__(self, params: pika.URLParameters) -> None:
        self.error: BaseException | None = None
        self._open = False
        self._closing = False
        self._until: Callable[[], bool] | None = None
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
        )

    @classmethod
    def open(cls, params: pika.URLParameters) -> _Link:
        """A connected link; the pika error when it could not connect."""
        link = cls(params)
        try:
            link.wait(lambda: link._open, float(params.socket_timeout or RPC_TIMEOUT) + 1)
        except (ValueError, OSError) as exc:  # pika lets a reset while connecting escape
            link.close()
            raise pika.exceptions.AMQPConnectionError(f"connecting failed: {exc!r}") from exc
        except BaseException:
            link.close()
            raise
        if not link._open:
            link.close()
            raise pika.exceptions.AMQPConnectionError("no connection in time")
        return link

    def wait(self, until: Callable[[], bool], timeout: float) -> bool:
        """Drive the I/O loop until ``until()`` (True) or ``timeout`` (False); raise its error."""
        if self.error is None and not until():
            ioloop = self.conn.ioloop
            self._until = until
            timer = ioloop.call_later(max(timeout, 0.0), ioloop.stop)
            try:
                ioloop.start()
            finally:
                ioloop.remove_timeout(timer)
                self._until = None
        if self.error is not None:
            raise self.error
        return until()

    def flush(self) -> None:
        """Send what is queued (an ack) without waiting for anything."""
        self.wait(lambda: False, 0.0)

    def poke(self) -> None:
        """Stop the loop if what the caller waits for has happened."""
        if self._until is not None and (self.error is not None or self._until()):
            self.conn.ioloop.stop()

    def channel(self) -> Any:
        """A new open channel; a broker-closed channel fails the link."""
        opened: list[Any] = []

        def on_open(channel: Any) -> None:
            channel.add_on_close_callback(self._on_channel_closed)
            opened.append(channel)
            self.poke()

        self.conn.channel(on_open_callback=on_open)
        if not self.wait(lambda: bool(opened), RPC_TIMEOUT):
            raise pika.exceptions.AMQPConnectionError("no channel in time")
        return opened[0]

    def call(self, request: Callable[[Callable[[Any], None]], object]) -> Any:
        """Send a request whose reply comes to a callback, and wait for that reply."""
        replies: list[Any] = []

        def done(frame: Any) -> None:
            replies.append(frame)
            self.poke()

        request(done)
        if not self.wait(lambda: bool(replies), RPC_TIMEOUT):
            raise pika.exceptions.AMQPConnectionError("no reply from the broker in time")
        return replies[0]

    def close(self) -> None:
        """Close the connection (politely if the broker answers) and release the loop."""
        conn, self._closing = self.conn, True
        if not (conn.is_closed or conn.is_closing):
            conn.close()
        if not conn.is_closed:
            self.error = None
            deadline = time.monotonic() + 2.0
            while not conn.is_closed and time.monotonic() < deadline:
                try:
                    self.wait(lambda: bool(conn.is_closed), deadline - time.monotonic())
                except pika.exceptions.AMQPError:
                    break
        conn.ioloop.close()

    def _on_open(self, _conn: Any) -> None:
        self._open = True
        self.poke()

    def _on_failed(self, _conn: Any, error: BaseException) -> None:
        if not self._closing:
            self.error = self.error or error
        self.poke()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.error = self.error or reason
            self.poke()


def _weather(exc: BaseException) -> bool:
    """Connection trouble is retried; a refused login or a broker's refusal is not."""
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return bool(exc.reply_code == CONNECTION_FORCED)
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and not login_refused(exc)
