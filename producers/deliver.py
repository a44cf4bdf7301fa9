"""Never lose an event: spool it first, publish, and forget it only once it is confirmed.

For each call:

1. every new message is written to the spool before anything is sent, so that even a
   SIGKILL while publishing cannot lose it (it is delivered by the next publish or flush);
2. the spool is flushed oldest first (the new messages being its newest), all in one
   ``publish`` so they share the confirm window; if another process holds the spool's
   flush lock, only this call's new messages are sent;
3. a message leaves the spool only after its confirm. Anything else stays there: a broker
   unreachable after retries, a nack, and a return (``Unroutable``: no queue bound, which
   is loud, names the route and suggests ``exitpipe topology``, but never loses the event).

If the spool cannot be written, the message is still published; only if that fails too is
it lost, and the result says so (the CLI's exit 69).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from producers.errors import BrokerError
from producers.publisher import Outcome, Outgoing, Publisher, problem
from producers.spool import Spool


class Status(enum.Enum):
    """The fate of the new messages of one ``deliver`` call, worst first."""

    LOST = "lost"  # some message was neither confirmed nor kept: the spool failed too
    SPOOLED = "spooled"  # some message is kept in the spool for a later delivery
    DELIVERED = "delivered"  # every new message was confirmed


@dataclass(frozen=True)
class Delivery:
    """What one ``deliver`` call did."""

    status: Status
    confirmed: int  # messages confirmed, spooled ones included
    waiting: int  # messages still in the spool afterwards, from any earlier call too
    problems: tuple[str, ...]  # why messages were not confirmed, one line each


@dataclass(frozen=True)
class _Entry:
    path: Path | None  # None: the spool could not take it
    message: Outgoing

    @property
    def key(self) -> Path | int:
        """The same for a new message and its spool file listed again."""
        return self.path if self.path is not None else id(self.message)


def deliver(publisher: Publisher, spool: Spool, messages: Sequence[Outgoing] = ()) -> Delivery:
    """Deliver ``messages`` and whatever waits in ``spool``; see the module docstring."""
    problems: list[str] = []
    new = [_spooled(spool, message, problems) for message in messages]
    with spool.flushing() as flusher:
        entries = _entries(spool, new, flusher)
        outcomes = _publish(publisher, [e.message for e in entries], problems)
        confirmed = _settle(spool, entries, outcomes, problems)
    return Delivery(_status(new, confirmed), len(confirmed), spool.count(), tuple(problems))


def _spooled(spool: Spool, message: Outgoing, problems: list[str]) -> _Entry:
    try:
        return _Entry(spool.put(message), message)
    except OSError as exc:
        problems.append(f"spool {spool.directory} cannot keep message {message.message_id}: {exc}")
        return _Entry(None, message)


def _entries(spool: Spool, new: list[_Entry], flusher: bool) -> list[_Entry]:
    """Oldest first: the spool's files (the new ones among them), then what it could not take."""
    unspooled = [e for e in new if e.path is None]
    if not flusher:
        return [e for e in new if e.path is not None] + unspooled
    return [_Entry(path, message) for path, message in spool.pending()] + unspooled


def _publish(publisher: Publisher, messages: list[Outgoing], problems: list[str]) -> list[Outcome]:
    if not messages:
        return []
    try:
        return publisher.publish(messages)
    except BrokerError as exc:
        problems.append(str(exc))
        outcomes: list[Outcome] = getattr(exc, "outcomes", [])
        return outcomes + [Outcome.INDETERMINATE] * (len(messages) - len(outcomes))


def _settle(
    spool: Spool, entries: list[_Entry], outcomes: list[Outcome], problems: list[str]
) -> set[Path | int]:
    """Forget the confirmed messages; return the keys of the confirmed entries."""
    confirmed: set[Path | int] = set()
    for entry, outcome in zip(entries, outcomes, strict=True):
        if outcome is Outcome.CONFIRMED:
            confirmed.add(entry.key)
            if entry.path is not None:
                spool.remove(entry.path)
        elif outcome is not Outcome.INDETERMINATE:  # an outage is reported once, above
            problems.append(str(problem(entry.message, outcome)))
    return confirmed


def _status(new: list[_Entry], confirmed: set[Path | int]) -> Status:
    pending = [e for e in new if e.key not in confirmed]
    if any(e.path is None for e in pending):
        return Status.LOST
    return Status.SPOOLED if pending else Status.DELIVERED
