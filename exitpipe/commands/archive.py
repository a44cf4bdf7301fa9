"""``exitpipe archive export [--from ..] [--until ..] > events.jsonl``.

Writes the archive as JSON lines, what ``replay --file`` reads, so an incident can travel with a
bug report and be replayed elsewhere. Each line is an envelope that keeps what the live sender
checks need (``{"namespace", "routing_key", "sender", "body"}``, DESIGN 4a), so the replay of a
file refuses what the live pipeline refused; ``--bodies`` writes the bare wire bodies instead.
Bodies are written as archived; one that is valid but spread over several lines is written
compactly, and one that is not a valid event is left out and named on stderr (replay from the
archive skips it too).

The window options are shared with ``exitpipe replay``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from consumers.archive import Archive, Archived, ArchiveMissing, Window, parse_start, parse_time
from consumers.senders import sender_of
from exitpipe.settings import Settings
from producers.errors import BrokerError
from schemas.events import BadMessage, parse_body
from schemas.topology import Names

EX_OK = 0
EX_USAGE = 2
EX_UNAVAILABLE = 69
WINDOW_HELP = """\
Where to read: --from first (the default), last (the newest chunk), an offset, or a time;
--until a time. A time is RFC 3339 with an offset (2026-01-31T12:00:00Z) or a time ago (30m,
2h, 1d). Reading stops at the end of the stream as it was when the read began."""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``archive export``."""
    parser = subparsers.add_parser("archive", help="the archive stream of every event")
    actions = parser.add_subparsers(dest="archive_command", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        parents=[common],
        help="write the archive as JSON lines (what `replay --file` reads)",
        epilog=WINDOW_HELP,
    )
    add_window(export)
    export.add_argument(
        "--bodies",
        action="store_true",
        help="bare wire bodies, without routing key and sender (replayed without sender checks)",
    )
    export.set_defaults(func=export_archive)


def add_window(parser: argparse.ArgumentParser) -> None:
    """``--from`` and ``--until``."""
    parser.add_argument(
        "--from",
        dest="start",
        type=_start,
        default=None,
        metavar="first|last|OFFSET|TIME",
        help="where in the archive to begin (default: first)",
    )
    parser.add_argument("--until", type=_time, metavar="TIME", help="the latest publish time")


def window(args: argparse.Namespace) -> Window:
    """The window the options give."""
    return Window(start=args.start if args.start is not None else "first", until=args.until)


def open_archive(settings: Settings, retry_seconds: float | None = None) -> Archive:
    """The namespace's archive stream."""
    return Archive(
        settings.amqp_url,
        Names(settings.namespace).archive,
        prefetch=settings.prefetch,
        heartbeat=settings.heartbeat,
        retry_seconds=settings.retry_seconds if retry_seconds is None else retry_seconds,
        ca_file=settings.amqp_ca_file,
    )


def broker_status(command: str, exc: BrokerError) -> int:
    """Say what went wrong; 2 for a namespace without the queue, else 69."""
    print(f"exitpipe {command}: {exc}", file=sys.stderr)
    return EX_USAGE if isinstance(exc, ArchiveMissing) else EX_UNAVAILABLE


def _start(text: str) -> Any:
    try:
        return parse_start(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--from: {exc}") from None


def _time(text: str) -> Any:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--until: {exc}") from None


def export_archive(args: argparse.Namespace, settings: Settings) -> int:
    """Write the window's events to stdout as JSON lines."""
    started = time.perf_counter()
    try:
        messages = open_archive(settings).read(window(args))
        names = None if args.bodies else Names(settings.namespace)
        written, skipped = write_lines(messages, sys.stdout.buffer, names)
    except BrokerError as exc:
        return broker_status("archive export", exc)
    seconds = time.perf_counter() - started
    note = f", {skipped} unreadable skipped" if skipped else ""
    print(f"exported {written} events in {seconds:.2f} s{note}", file=sys.stderr)
    return EX_OK


def write_lines(
    messages: Iterator[Archived], out: BinaryIO, names: Names | None = None
) -> tuple[int, int]:
    """Write each archived event as one line, in an envelope with ``names``; (written, skipped)."""
    written = skipped = 0
    for message in messages:
        body = message.body
        try:
            event = parse_body(body)
        except BadMessage as exc:
            print(
                f"exitpipe archive export: offset {message.offset}: {exc.reason} (skipped)",
                file=sys.stderr,
            )
            skipped += 1
            continue
        line = body if b"\n" not in body and b"\r" not in body else event.to_json()
        if names is not None:
            line = _envelope(names, message, line)
        out.write(line + b"\n")
        written += 1
    out.flush()
    return written, skipped


def _envelope(names: Names, message: Archived, body: bytes) -> bytes:
    sender = sender_of(names, message.user_id, message.headers)
    head = {"namespace": names.ns, "routing_key": message.routing_key, "sender": sender}
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"body":' + body + b"}"
