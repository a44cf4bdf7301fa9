"""``exitpipe dead list [--json]``, ``dead requeue --id ID | --all``, ``dead purge [--yes]``.

``list`` leaves every message where it is. ``requeue`` sends messages back to the exchange
that feeds their source queue, with their original routing key, and removes each from the
dead-letter queue only after the broker confirmed the copy. ``purge`` deletes them all, after
asking on a terminal (``--yes`` to go on without one).

Exit statuses: 0 done; 1 ``requeue --id`` found no such message, or a message could not be
sent back (its source is unknown); 2 bad arguments, no terminal to ask on, or a namespace
without a dead-letter queue; 69 the broker is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from consumers.dead_letters import DeadLetters, DeadLettersMissing, DeadMessage
from exitpipe.commands.table import render
from exitpipe.settings import Settings, redact
from producers.errors import BrokerError
from schemas.topology import Names

EX_OK = 0
EX_NOT_DONE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``dead list``, ``dead requeue`` and ``dead purge``."""
    parser = subparsers.add_parser("dead", help="the dead-letter queue")
    actions = parser.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="show dead letters (reason, source, count), keep them"
    )
    listing.add_argument("--json", action="store_true", help="a JSON list")
    listing.set_defaults(func=list_dead)
    requeue = actions.add_parser(
        "requeue", parents=[common], help="send dead letters back to where they came from"
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="message_id", metavar="ID", help="the message with this id")
    which.add_argument("--all", action="store_true", help="every dead letter")
    requeue.set_defaults(func=requeue_dead)
    purge = actions.add_parser("purge", parents=[common], help="delete every dead letter")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    purge.set_defaults(func=purge_dead)


def _queue(settings: Settings) -> DeadLetters:
    return DeadLetters(
        settings.amqp_url,
        Names(settings.namespace),
        retry_seconds=settings.retry_seconds,
        ca_file=settings.amqp_ca_file,
    )


def _broker(exc: BrokerError) -> int:
    print(f"exitpipe dead: {exc}", file=sys.stderr)
    return EX_USAGE if isinstance(exc, DeadLettersMissing) else EX_UNAVAILABLE


def list_dead(args: argparse.Namespace, settings: Settings) -> int:
    """Print every dead letter; none is taken out of the queue."""
    try:
        messages = _queue(settings).browse()
    except BrokerError as exc:
        return _broker(exc)
    if args.json:
        print(json.dumps([m.as_json() for m in messages], indent=2))
        return EX_OK
    rows = [_cells(m) for m in messages]
    print(render(["message id", "reason", "source", "deaths", "routing key", "body"], rows))
    print(f"{len(messages)} dead letter(s) in {Names(settings.namespace).dead_letters}")
    return EX_OK


def _cells(message: DeadMessage) -> list[object]:
    return [
        message.message_id,
        message.reason,
        message.source,
        message.count,
        message.routing_key,
        message.preview(),
    ]


def requeue_dead(args: argparse.Namespace, settings: Settings) -> int:
    """Send the chosen dead letters back; 1 if one was not found or could not go back."""
    wanted = args.message_id
    queue = _queue(settings)
    if not queue.vouches:
        names = Names(settings.namespace)
        print(
            f"exitpipe dead requeue: not run as {names.operator_user}: the consumers will judge"
            " the requeued messages as this user's, not as their original senders'",
            file=sys.stderr,
        )
    try:
        results = queue.requeue(lambda m: args.all or m.message_id == wanted)
    except BrokerError as exc:
        return _broker(exc)
    for message, what in results:
        print(f"{message.message_id}: {what}")
    if wanted is not None and not results:
        print(f"exitpipe dead requeue: no dead letter with id {wanted!r}", file=sys.stderr)
        return EX_NOT_DONE
    left = [m for m, what in results if what.startswith("left")]
    print(f"requeued {len(results) - len(left)} message(s)", file=sys.stderr)
    return EX_NOT_DONE if left else EX_OK


def purge_dead(args: argparse.Namespace, settings: Settings) -> int:
    """Delete every dead letter after asking (or with ``--yes``)."""
    queue = _queue(settings)
    if not args.yes and not sys.stdin.isatty():
        print("exitpipe dead purge: asks on a terminal; --yes purges without", file=sys.stderr)
        return EX_USAGE
    try:
        if not args.yes:
            count = queue.count()
            where = f"{queue.names.dead_letters} on {redact(settings.amqp_url)}"
            if not _confirmed(f"delete {count} dead letter(s) from {where}? [y/N] "):
                print("exitpipe dead purge: nothing deleted", file=sys.stderr)
                return EX_OK
        purged = queue.purge()
    except BrokerError as exc:
        return _broker(exc)
    print(f"purged {purged} dead letter(s)")
    return EX_OK


def _confirmed(question: str) -> bool:
    sys.stderr.write(question)
    sys.stderr.flush()
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False
