"""The producers' exceptions, raised at the pika boundary with the pika cause chained.

::

    BrokerError                  anything the broker side did not do for us
     +-- BrokerUnreachable       no connection could be made, or it was lost, and retrying for
     |                           ``retry_seconds`` did not help (also: login or vhost refused,
     |                           which is raised at once, never retried)
     +-- PublishRefused          the broker nacked a message, or closed the channel on it
     +-- Unroutable              a mandatory message came back: no queue is bound for its route
     +-- TopologyMismatch        an exchange or queue exists with other arguments (406)

Only ``BrokerUnreachable`` is weather; the others are bugs or configuration and are never
retried. Messages never carry a password: URLs go through ``redact`` first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from producers.publisher import Outcome


def redact(url: str) -> str:
    """A URL, or a comma-separated list of them, with every password replaced by ``***``,
    for logs and messages (never raises)."""
    return ",".join(_redact_one(part) for part in _NEXT_URL.split(url))


# A list is split only where the next URL starts, so that a comma inside a password (which
# ``producers.connection`` refuses, but which a message may still have to show) is not a cut.
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not at or not colon:
        return url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


class BrokerError(Exception):
    """Base of every producer-side broker failure."""


class BrokerUnreachable(BrokerError):
    """The broker could not be reached, or the connection died, and retries ran out.

    ``outcomes`` (when raised by ``Publisher.publish``) holds one outcome per message of the
    call, in order: the confirmed, nacked and returned ones as they ended, the rest
    INDETERMINATE (perhaps delivered, perhaps not: re-send them with the same id).
    """

    def __init__(self, message: str, outcomes: Sequence[Outcome] = ()) -> None:
        super().__init__(message)
        self.outcomes: list[Outcome] = list(outcomes)


class PublishRefused(BrokerError):
    """The broker refused a message: it nacked it, or closed the channel on it."""

    def __init__(self, message: str, outcomes: Sequence[Outcome] = ()) -> None:
        super().__init__(message)
        self.outcomes: list[Outcome] = list(outcomes)


class Unroutable(BrokerError):
    """A mandatory message was returned: no queue is bound for its exchange and routing key."""

    def __init__(self, exchange: str, routing_key: str, message_id: str = "") -> None:
        about = f" (message {message_id})" if message_id else ""
        super().__init__(
            f"no queue is bound for exchange {exchange!r} routing key {routing_key!r}{about}:"
            " is the topology declared? run `exitpipe topology` for this namespace"
        )
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id


class TopologyMismatch(BrokerError):
    """An exchange or queue exists with a different kind or arguments than declared."""
