"""Opening a broker connection: one node or the nodes of a cluster, TLS, heartbeats.

``EXITPIPE_AMQP_URL`` (and every ``--amqp-url``) holds one URL or a comma-separated list of
them, the nodes of one RabbitMQ cluster, each with its own credentials, virtual host and TLS
(``amqps://``). Every connection exitpipe opens gets its pika parameters here, so every one
of them fails over the same way:

- a ``BlockingConnection`` (topology, dead letters) takes ``Nodes.parameters``, the whole
  list, and pika tries each node in turn;
- a ``SelectConnection`` (the publisher, the consumers, the archive reader) takes one node:
  ``Nodes.current`` is the node to try, ``Nodes.advance()`` moves on after it failed, so a
  connection stays with a node that works and each retry goes to the next one.

``parse_urls`` refuses a bad list and says why; the settings call it, so a bad list is refused
at start. Its reasons never quote a URL (a password could hide in one): a comma inside a URL is
written ``%2C``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from tenacity import RetryCallState

from producers.errors import BrokerError, redact
from producers.headers import tolerate_hostile_headers
from producers.tls import connection_parameters as tls_parameters

SCHEMES = ("amqp", "amqps")
LOGIN_REFUSED = (
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)


def parse_urls(text: str) -> tuple[str, ...]:
    """The broker URLs of a comma-separated list; ValueError with the reason for a bad one."""
    urls = tuple(part.strip() for part in text.split(","))
    seen: dict[tuple[str, int], int] = {}
    for number, url in enumerate(urls, 1):
        where = "the URL " if len(urls) == 1 else f"URL {number} of {len(urls)} "
        node = _node(url, where)
        if node in seen:
            raise ValueError(
                f"{where}names the node of URL {seen[node]} again ({node[0]}:{node[1]})"
            )
        seen[node] = number
    return urls


def _node(url: str, where: str) -> tuple[str, int]:
    """(host, port) of one URL; ValueError naming what is wrong, without quoting it."""
    if not url:
        raise ValueError(f"{where}is empty (a stray comma?)")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{where}must start with amqp:// or amqps://")
    try:
        parts.port  # noqa: B018 (it parses the port, and raises for a bad one)
    except ValueError:
        raise ValueError(
            f"{where}has a port that is not a number from 0 to 65535"
            " (a comma inside a URL is written %2C)"
        ) from None
    try:
        params = pika.URLParameters(url)
    except Exception as exc:  # pika checks its query options with ValueErrors and asserts
        raise ValueError(f"{where}has an option pika refuses ({type(exc).__name__})") from None
    return str(params.host), int(params.port)


def node_parameters(
    url: str,
    *,
    heartbeat: int = 30,
    connect_timeout: float = 5.0,
    ca_file: Path | str | None = None,
    name: str = "exitpipe-producer",
) -> pika.URLParameters:
    """pika parameters for one node (TLS as ``producers.tls`` sets it up), one connect attempt
    each, since retrying is ours; a bad URL or CA file is a BrokerError."""
    tolerate_hostile_headers()  # every connection of exitpipe is made with these parameters
    try:
        params = tls_parameters(url, Path(ca_file) if ca_file else None, heartbeat)
    except ValueError as exc:
        raise BrokerError(f"bad broker URL {redact(url)}: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"CA file {ca_file}: {exc}") from exc
    params.socket_timeout = connect_timeout
    params.stack_timeout = connect_timeout
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


class Nodes:
    """The nodes of one URL setting, their parameters, and which one to try next.

    Not thread-safe: each connection owner (a publisher, a consumer) has its own.
    """

    def __init__(
        self,
        urls: str,
        *,
        heartbeat: int = 30,
        connect_timeout: float = 5.0,
        ca_file: Path | str | None = None,
        name: str = "exitpipe-producer",
    ) -> None:
        try:
            self.urls = parse_urls(urls)
        except ValueError as exc:
            raise BrokerError(f"bad broker URL list: {exc}") from None
        self.parameters = [
            node_parameters(
                url,
                heartbeat=heartbeat,
                connect_timeout=connect_timeout,
                ca_file=ca_file,
                name=name,
            )
            for url in self.urls
        ]
        self._index = 0

    def __len__(self) -> int:
        return len(self.urls)

    def __str__(self) -> str:
        return redact(",".join(self.urls))

    @property
    def current(self) -> Any:
        """The parameters of the node to connect to now (pika's ``URLParameters``)."""
        return self.parameters[self._index]

    @property
    def url(self) -> str:
        """The current node's URL, redacted, for messages."""
        return redact(self.urls[self._index])

    def advance(self) -> None:
        """The current node failed or went away: the next attempt goes to the next node."""
        self._index = (self._index + 1) % len(self.urls)


def first_url(text: str) -> str:
    """The first URL of a list (the one whose vhost and user name a command takes)."""
    return parse_urls(text)[0]


Wait = Callable[[RetryCallState], float]


def each_node_first(nodes: Nodes, wait: Wait) -> Wait:
    """A tenacity wait that tries every node once before backing off: no pause before an
    attempt on a node not yet tried in this round, ``wait`` after a whole round failed."""

    def pick(state: RetryCallState) -> float:
        if state.attempt_number % len(nodes):
            return 0.0
        return wait(state)

    return pick


def login_refused(error: BaseException) -> bool:
    """True when the broker refused the login or the vhost: configuration, never retried.

    pika also reports a connection that was merely lost during the handshake (a node shutting
    down or restarting as we connected) as a "probable" refusal; that one is weather, and the
    next attempt (the next node) may well succeed.
    """
    if not isinstance(error, LOGIN_REFUSED):
        return False
    cause = str(error.args[0]) if error.args else ""
    return not cause.startswith("StreamLostError")


def connect_blocking(parameters: Sequence[Any]) -> Any:
    """A ``BlockingConnection`` to the first of ``parameters`` that takes one, else the last
    node's ``AMQPConnectionError``.

    pika tries a list by itself, but a socket reset in the middle of its connect phase (a node
    that accepts and drops at once, as a proxy with its backend down does) escapes its loop as
    a ValueError that ends the whole list: each node is tried here, that error counted as its
    failure.
    """
    error: pika.exceptions.AMQPConnectionError | None = None
    for params in parameters:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.AMQPConnectionError as exc:
            error = exc
        except (ValueError, OSError) as exc:
            error = pika.exceptions.AMQPConnectionError(f"connecting failed: {exc!r}")
            error.__cause__ = exc
    assert error is not None, "no broker parameters"
    raise error


_TIMER_LOST = 0.5  # seconds: a zero timer not run by then was dropped


class OneWriteConnection(SelectConnection):  # type: ignore[misc]
    """A ``SelectConnection`` that gives the socket what a turn of its loop wrote as one write.

    pika writes every frame with a system call of its own (method, header and body of each
    publish, each ack), and with TCP_NODELAY each is a packet the broker reads on its own:
    for a daemon, four or more per message. Here frames gather while the loop turn lasts and
    go out together after it (a zero timer, as the consumer's acks do); the bytes and their
    order are the same.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._outgoing = bytearray()
        self._timer_set: float | None = None  # when the zero timer that sends them was set
        super().__init__(*args, **kwargs)

    def _adapter_emit_data(self, data: bytes) -> None:
        self._outgoing += data
        now = time.monotonic()
        # pika drops the other due timers of a turn when one of them raises: a timer set
        # long ago that never ran is set again, so frames never wait for good.
        if self._timer_set is None or now - self._timer_set > _TIMER_LOST:
            self._timer_set = now
            self.ioloop.call_later(0, self._emit_outgoing)

    def _emit_outgoing(self) -> None:
        self._timer_set = None
        if self._outgoing and self._transport is not None:
            data, self._outgoing = bytes(self._outgoing), bytearray()
            super()._adapter_emit_data(data)
