"""The dead-letter adapter: look at, send back and purge ``<ns>.dead-letters``.

Two kinds of message end there (DESIGN 3): bad input a consumer republished with the headers
``x-exitpipe-error`` and ``x-exitpipe-source``, and messages the broker dead-lettered itself
(the delivery limit) with its ``x-death`` header. ``DeadMessage`` reads both the same way.

Looking is not taking: ``browse`` gets every message without acknowledging it and then gives
them all back (``basic.nack`` with requeue), so a listing leaves the queue as it found it. The
dead-letter queue has no delivery limit, so giving back never dead-letters anything further.

``requeue`` sends a message back to where it came from (the exchange that feeds its source
queue, with its original routing key), waits for the broker's confirm, and only then acks the
dead letter: a crash in between leaves a copy in both places, which is safe because the
store ignores an event id it has already applied. The message goes back as its original
sender's: published under the operator's own ``user_id`` with that sender in
``x-exitpipe-sender``, which the consumers believe from ``<ns>-operator`` and from nobody else
(``consumers.senders``), so a requeued message is judged exactly as its first delivery was.
Run as another user, the requeued messages are judged as that user's (``vouches`` says which).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from consumers.senders import dead_letter_sender, written_by_daemon
from producers.connection import Nodes, connect_blocking, each_node_first, login_refused
from producers.errors import BrokerError, BrokerUnreachable, redact
from producers.publisher import describe
from schemas.topology import ERROR_HEADER, SENDER_HEADER, SOURCE_HEADER, Names

log = logging.getLogger(__name__)
T = TypeVar("T")
PREVIEW_CHARS = 60
# Headers that describe one stay in the dead-letter queue, not the message: dropped on requeue
# so that a new failure records a new reason. x-death stays: it counts deaths across requeues.
_DROPPED_ON_REQUEUE = (ERROR_HEADER, SOURCE_HEADER, SENDER_HEADER, "x-delivery-count")


@dataclass(frozen=True)
class DeadMessage:
    """One dead letter, read from its headers."""

    tag: int
    message_id: str | None
    reason: str
    source: str | None
    count: int
    routing_key: str
    body: bytes
    properties: Any
    sender: str | None = None

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        """The start of the body as printable text."""
        text = self.body[: chars * 4].decode("utf-8", errors="replace")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
        return text if len(text) <= chars else text[: chars - 1] + "…"

    def as_json(self) -> dict[str, object]:
        """One entry of ``dead list --json``."""
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "source": self.source,
            "count": self.count,
            "routing_key": self.routing_key,
            "sender": self.sender,
            "preview": self.preview(),
        }


def dead_message(names: Names, tag: int, routing_key: str, props: Any, body: bytes) -> DeadMessage:
    """A delivery from the dead-letter queue, its reason, source, sender and deaths read."""
    headers: Mapping[str, Any] = props.headers or {}
    deaths = [d for d in headers.get("x-death") or () if isinstance(d, Mapping)]
    first = deaths[0] if deaths else {}
    keys = first.get("routing-keys") or [routing_key]
    # exitpipe's headers are believed from a daemon only: on a message the broker
    # dead-lettered, they are whatever its original publisher wrote.
    ours = headers if written_by_daemon(names, props.user_id, headers) else {}
    return DeadMessage(
        tag=tag,
        message_id=props.message_id,
        reason=_text(ours.get(ERROR_HEADER) or first.get("reason") or "unknown"),
        source=_text(ours.get(SOURCE_HEADER) or first.get("queue")) or None,
        count=sum(int(d.get("count", 0)) for d in deaths),
        routing_key=_text(keys[0]),
        body=body,
        properties=props,
        sender=dead_letter_sender(names, props.user_id, headers),
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def route_back(names: Names, message: DeadMessage) -> tuple[str, str] | None:
    """The exchange and routing key that feed the message's source queue; None if unknown."""
    exchanges = {names.classify: names.events, names.job_state: names.jobs}
    exchange = exchanges.get(message.source or "")
    return (exchange, message.routing_key) if exchange else None


class DeadLettersMissing(BrokerError):
    """The namespace has no dead-letter queue (wrong namespace, or no topology declared)."""


class DeadLetters:
    """The dead-letter queue of one namespace."""

    def __init__(
        self,
        url: str,
        names: Names,
        *,
        retry_seconds: float = 30.0,
        ca_file: Path | str | None = None,
    ) -> None:
        self.url = url
        self.names = names
        self.retry_seconds = retry_seconds
        self._nodes = Nodes(url, ca_file=ca_file, name="exitpipe-dead-letters")
        # The operator's login: requeued messages carry it as user_id (the broker checks it).
        # With several nodes, the login of the node connected to (``_connect``).
        self._user_id = _login(self._nodes.current)

    @property
    def vouches(self) -> bool:
        """Whether consumers believe the original sender of what this user requeues."""
        return self._user_id == self.names.operator_user

    def browse(self) -> list[DeadMessage]:
        """Every dead letter, left in the queue."""
        return self._session(lambda conn: list(_borrowed(conn, self.names)))

    def requeue(self, wanted: Callable[[DeadMessage], bool]) -> list[tuple[DeadMessage, str]]:
        """Send each wanted message back to its source, then ack it; what became of each."""
        return self._session(lambda conn: self._requeue(conn, wanted))

    def count(self) -> int:
        """How many messages wait in the dead-letter queue."""
        return self._session(lambda conn: _count(conn, self.names.dead_letters))

    def purge(self) -> int:
        """Delete every dead letter; how many were deleted."""
        queue = self.names.dead_letters
        return self._session(
            lambda conn: int(conn.channel().queue_purge(queue).method.message_count)
        )

    def _requeue(
        self, conn: Any, wanted: Callable[[DeadMessage], bool]
    ) -> list[tuple[DeadMessage, str]]:
        publisher = conn.channel()
        publisher.confirm_delivery()
        results = []
        with _borrowing(conn, self.names) as (channel, messages):
            for message in messages:
                if not wanted(message):
                    continue
                route = route_back(self.names, message)
                if route is None:
                    results.append((message, f"left: unknown source queue {message.source!r}"))
                    continue
                _publish_back(publisher, route, message, self._user_id)
                channel.basic_ack(message.tag)
                results.append((message, f"requeued to {route[0]} with key {route[1]}"))
        return results

    def _session(self, work: Callable[[Any], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(_weather),
            stop=stop_after_delay(self.retry_seconds),
            wait=each_node_first(
                self._nodes, wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.2)
            ),
            reraise=True,
        )
        try:
            conn = retrying(self._connect)
        except pika.exceptions.AMQPConnectionError as exc:
            raise BrokerUnreachable(
                f"broker {redact(self.url)} unreachable: {describe(exc)}"
            ) from exc
        try:
            return work(conn)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise DeadLettersMissing(
                    f"no dead-letter queue {self.names.dead_letters!r}: wrong namespace, or the"
                    " topology was never declared (`exitpipe topology`)"
                ) from exc
            raise BrokerError(f"dead letters: {describe(exc)}") from exc
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise BrokerError(f"the broker did not take a requeued message: {exc}") from exc
        except pika.exceptions.AMQPConnectionError as exc:
            raise BrokerUnreachable(f"broker {redact(self.url)}: {describe(exc)}") from exc
        finally:
            if conn.is_open:
                conn.close()

    def _connect(self) -> Any:
        """A connection to the current node; on failure the next attempt goes to the next."""
        params = self._nodes.current
        try:
            conn = connect_blocking([params])
        except pika.exceptions.AMQPConnectionError:
            self._nodes.advance()
            raise
        self._user_id = _login(params)
        return conn


def _login(params: Any) -> str | None:
    return getattr(params.credentials, "username", None) or None


@contextmanager
def _borrowing(conn: Any, names: Names) -> Iterator[tuple[Any, Iterator[DeadMessage]]]:
    """Get messages without acking; whatever is not acked goes back at the end."""
    channel = conn.channel()
    queue = names.dead_letters
    try:
        yield channel, _gets(channel, names, _count(conn, queue))
    finally:
        if channel.is_open:
            channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            channel.close()


def _borrowed(conn: Any, names: Names) -> Iterator[DeadMessage]:
    with _borrowing(conn, names) as (_channel, messages):
        yield from list(messages)


def _gets(channel: Any, names: Names, limit: int) -> Iterator[DeadMessage]:
    # basic.get never hands out a message this channel holds unacked; the limit (the count
    # when we began) keeps a requeued message that dies again at once from coming round.
    for _ in range(limit):
        method, props, body = channel.basic_get(names.dead_letters, auto_ack=False)
        if method is None:
            return
        yield dead_message(names, method.delivery_tag, method.routing_key, props, body)


def _publish_back(
    channel: Any, route: tuple[str, str], message: DeadMessage, user_id: str | None
) -> None:
    props = message.properties
    headers = {k: v for k, v in (props.headers or {}).items() if k not in _DROPPED_ON_REQUEUE}
    headers[SENDER_HEADER] = message.sender or ""  # "": sent by nobody authenticated
    channel.basic_publish(
        route[0],
        route[1],
        message.body,
        pika.BasicProperties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            headers=headers,
            delivery_mode=2,
            user_id=user_id,
            message_id=props.message_id,
            timestamp=props.timestamp,
            type=props.type,
            app_id=props.app_id,
            correlation_id=props.correlation_id,
        ),
        mandatory=True,
    )


def _count(conn: Any, queue: str) -> int:
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue, passive=True).method.message_count)
    finally:
        if channel.is_open:
            channel.close()


def _weather(exc: BaseException) -> bool:
    return isinstance(exc, pika.exceptions.AMQPConnectionError) and not login_refused(exc)
