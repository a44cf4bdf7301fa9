"""Broker names and arguments of DESIGN section 4, as data.

Everything here is a pure function of the namespace and the retention settings, so that
``exitpipe topology``, ``--check``, the daemons and the tests declare exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.codes import Action, JobStatus
from schemas.events import Event, ExitEvent, LifecycleEvent, Transition

DEFAULT_NAMESPACE = "exitpipe"
DEFAULT_DELIVERY_LIMIT = 5
DEFAULT_ARCHIVE_MAX_AGE = "7D"
DEFAULT_ARCHIVE_MAX_BYTES = 1_000_000_000
ERROR_HEADER = "x-exitpipe-error"
SOURCE_HEADER = "x-exitpipe-source"
# The original sender of a dead letter, written by the daemon that dead-lettered it and kept
# by ``dead requeue``; believed only under conditions ``consumers.senders`` spells out.
SENDER_HEADER = "x-exitpipe-sender"


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str = "topic"


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key pattern)
    # Bindings an earlier version declared and this one removes (unbinding is idempotent).
    retired: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Names:
    """The names of one namespace's exchanges and queues."""

    ns: str

    @property
    def events(self) -> str:
        return f"{self.ns}.events"

    @property
    def jobs(self) -> str:
        return f"{self.ns}.jobs"

    @property
    def classify(self) -> str:
        return f"{self.ns}.classify"

    @property
    def job_state(self) -> str:
        return f"{self.ns}.job-state"

    @property
    def archive(self) -> str:
        return f"{self.ns}.archive"

    @property
    def dead(self) -> str:
        return f"{self.ns}.dead"

    @property
    def dead_letters(self) -> str:
        return f"{self.ns}.dead-letters"

    # The broker users of ``exitpipe topology --users`` (DESIGN 4a).

    @property
    def site_prefix(self) -> str:
        return f"{self.ns}-site-"

    def site_user(self, site: str) -> str:
        return f"{self.site_prefix}{site}"

    @property
    def server_user(self) -> str:
        return f"{self.ns}-server"

    @property
    def classifier_user(self) -> str:
        return f"{self.ns}-classifier"

    @property
    def job_state_user(self) -> str:
        return f"{self.ns}-job-state"

    @property
    def operator_user(self) -> str:
        """The one user whose ``x-exitpipe-sender`` is believed: it requeues dead letters."""
        return f"{self.ns}-operator"

    def is_role_user(self, user: str) -> bool:
        """True for a user that ``topology --users`` made for one role of this namespace."""
        return user.startswith(self.site_prefix) or user in (
            self.server_user,
            self.classifier_user,
            self.job_state_user,
            self.operator_user,
        )


@dataclass(frozen=True)
class Topology:
    """Everything one namespace declares."""

    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]


def _quorum(size: int | None) -> dict[str, Any]:
    """A quorum queue's arguments; ``size`` replicas when it is created (None: the broker's
    default, every node of the cluster). RabbitMQ keeps the size a queue was declared with."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if size is not None:
        arguments["x-quorum-initial-group-size"] = size
    return arguments


def _work_queue(
    names: Names, name: str, binding: tuple[str, str], limit: int, size: int | None
) -> Queue:
    # At-least-once dead-lettering needs reject-publish overflow; without it RabbitMQ's
    # default at-most-once strategy drops a dead letter whose target is missing.
    return Queue(
        name,
        {
            **_quorum(size),
            "x-delivery-limit": limit,
            "x-dead-letter-exchange": names.dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
        (binding,),
    )


def topology(
    ns: str = DEFAULT_NAMESPACE,
    *,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    archive_max_age: str = DEFAULT_ARCHIVE_MAX_AGE,
    archive_max_bytes: int = DEFAULT_ARCHIVE_MAX_BYTES,
    quorum_size: int | None = None,
) -> Topology:
    """The exchanges and queues of namespace ``ns``; ``quorum_size``: replicas of each quorum
    queue (None: every node of the cluster, RabbitMQ's default)."""
    n = Names(ns)
    return Topology(
        exchanges=(Exchange(n.events), Exchange(n.jobs), Exchange(n.dead)),
        queues=(
            _work_queue(n, n.classify, (n.events, "exit.#"), delivery_limit, quorum_size),
            _work_queue(n, n.job_state, (n.jobs, "#"), delivery_limit, quorum_size),
            Queue(
                n.archive,
                {
                    "x-queue-type": "stream",
                    "x-max-age": archive_max_age,
                    "x-max-length-bytes": archive_max_bytes,
                },
                # Exit and lifecycle events only: a transition is the classifier's output, which
                # replay derives again and the store's history records, and leaving it out
                # spares the broker a stream write for every reported exit (DESIGN 4).
                ((n.events, "#"), (n.jobs, "lifecycle.#")),
                retired=((n.jobs, "#"),),
            ),
            Queue(n.dead_letters, _quorum(quorum_size), ((n.dead, "#"),)),
        ),
    )


def status_key(status: JobStatus) -> str:
    """A status as a routing-key word: ``FINISHED:ABORTED`` -> ``FINISHED.ABORTED``."""
    return status.value.replace(":", ".")


def route(names: Names, event: Event) -> tuple[str, str]:
    """The exchange and routing key an event is published with."""
    if isinstance(event, ExitEvent):
        return names.events, f"exit.{event.site}"
    if isinstance(event, LifecycleEvent):
        return names.jobs, f"lifecycle.{status_key(event.status)}"
    if isinstance(event, Transition):
        return names.jobs, f"transition.{Action(event.action).value}"
    raise TypeError(f"not an event: {type(event).__name__}")
