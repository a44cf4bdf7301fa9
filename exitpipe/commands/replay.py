"""``exitpipe replay``: why did each job end this way, and what would another policy do.

Reads exit and lifecycle events from the archive stream (or a JSON-lines file) and runs them,
in memory, through the daemons' own decision code (``consumers.replay``); nothing live is
touched unless ``--republish`` is given and confirmed.

Exit statuses: 0 done (and, with ``--compare-policy``, nothing differs); 1 some job ends
differently under the other policy, and nothing else; 2 bad arguments, a bad
policy, an unreadable file, a namespace without an archive, or ``--republish`` off a terminal
without ``--yes``; 69 the broker is unreachable (or did not take every republished event).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

import orjson

from consumers.archive import Archive, Archived
from consumers.explain import why
from consumers.policy import Policy, PolicyError, load_policy
from consumers.replay import (
    Checks,
    Difference,
    Replay,
    Replayer,
    Step,
    Unreadable,
    compare,
    gc_paused,
    parse_archived,
    parse_lines,
    timeline_exits,
)
from consumers.store import JobView
from exitpipe.commands.archive import WINDOW_HELP, add_window, broker_status, open_archive, window
from exitpipe.commands.producers import publisher_for
from exitpipe.commands.table import render
from exitpipe.settings import Settings, redact
from producers.errors import BrokerError
from producers.publisher import outgoing, problem
from schemas.events import Event, ExitEvent, LifecycleEvent, Transition
from schemas.topology import Names

EX_OK = 0
EX_DIFFERENT = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
PROGRESS_EVERY = 2048  # items between two looks at the clock for the progress bar
_INDENT = orjson.OPT_INDENT_2
_SECOND = "%Y-%m-%d %H:%M:%S"
SHOWN_UNREADABLE = 10  # unreadable inputs named one by one on stderr; the rest only counted

EPILOG = f"""\
{WINDOW_HELP}

--policy (or EXITPIPE_POLICY) is the policy replayed; --compare-policy replays under a second
one and shows only the jobs whose final status differs, with the event and the rules that
made the difference (exit status 1 when any does, so it can gate a policy change in CI).

Exit statuses: 0 done, nothing differs (--job matching nothing is said on stderr); 1 some
job ends differently under --compare-policy; 2 bad arguments or input; 69 broker unreachable;
70 an internal error."""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``replay``."""
    parser = subparsers.add_parser(
        "replay",
        parents=[common],
        help="job timelines and final states from the archive or a file, under any policy",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_window(parser)
    parser.add_argument("--file", metavar="PATH|-", help="read JSON lines instead (- is stdin)")
    parser.add_argument("--job", metavar="J", help="show only this job")
    parser.add_argument("--compare-policy", metavar="Q", help="built-in name or TOML file")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--republish",
        action="store_true",
        help="publish the selected exit and lifecycle events again, with their own ids",
    )
    parser.add_argument("--yes", action="store_true", help="republish without asking")
    parser.set_defaults(func=run_replay, exit_at_once=True)


@dataclass
class Read:
    """What a read gave: the replays, the unreadable inputs, and the events to republish."""

    replays: list[Replay]
    unreadable: list[Unreadable] = field(default_factory=list)
    selected: list[ExitEvent | LifecycleEvent] = field(default_factory=list)


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Read, replay, print; compare and republish when asked."""
    refusal = _refusal(args)
    if refusal:
        print(f"exitpipe replay: {refusal}", file=sys.stderr)
        return EX_USAGE
    try:
        policies = [load_policy(settings.policy)]
        if args.compare_policy:
            policies.append(load_policy(args.compare_policy))
    except PolicyError as exc:
        print(f"exitpipe replay: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        with gc_paused(freeze=True):
            started = time.perf_counter()
            read = _read(args, settings, policies)
            seconds = time.perf_counter() - started
    except BrokerError as exc:
        return broker_status("replay", exc)
    except OSError as exc:
        print(f"exitpipe replay: cannot read {args.file}: {exc}", file=sys.stderr)
        return EX_USAGE
    _report_rate(read, seconds)
    with gc_paused(freeze=True):  # the output is as large as what was read, and as acyclic
        status = _show(args, read)
    if args.republish:
        status = max(status, _republish(args, settings, read.selected))
    return status


def _refusal(args: argparse.Namespace) -> str | None:
    if args.file is not None and (args.start is not None or args.until is not None):
        return "--from and --until select part of the archive; with --file, cut the file instead"
    if args.yes and not args.republish:
        return "--yes only confirms --republish"
    if args.republish and not args.yes and (args.file == "-" or not sys.stdin.isatty()):
        return "--republish asks for confirmation on a terminal; give --yes to go on without"
    return None


# -- reading -----------------------------------------------------------------------------------


def _read(args: argparse.Namespace, settings: Settings, policies: list[Policy]) -> Read:
    replayers = [Replayer(policy) for policy in policies]
    read = Read([r.result for r in replayers])
    progress = Progress.on_stderr()
    checks = Checks(Names(settings.namespace), settings.require_site_user)
    if args.file is not None:
        items = _from_file(args.file, progress, checks)
    else:
        items = _from_archive(open_archive(settings), args, progress, checks)
    feeds = [r.feed for r in replayers]
    keep = _keeper(args, read) if args.republish else None
    for item in items:
        if isinstance(item, Unreadable):
            read.unreadable.append(item)
            if len(read.unreadable) <= SHOWN_UNREADABLE:
                progress.clear()
                print(f"exitpipe replay: {item.where}: {item.reason} (skipped)", file=sys.stderr)
            continue
        for feed in feeds:
            feed(item)
        if keep is not None:
            keep(item)
    progress.finish()
    return read


def _keeper(args: argparse.Namespace, read: Read) -> Callable[[Event], None]:
    def keep(event: Event) -> None:
        if not isinstance(event, Transition) and args.job in (None, event.job_id):
            read.selected.append(event)

    return keep


def _from_file(path: str, progress: Progress, checks: Checks) -> Iterator[Event | Unreadable]:
    if path == "-":
        yield from parse_lines(progress.lines(sys.stdin.buffer, None), checks)
        return
    with open(path, "rb") as stream:
        yield from parse_lines(progress.lines(stream, os.fstat(stream.fileno()).st_size), checks)


def _from_archive(
    archive: Archive, args: argparse.Namespace, progress: Progress, checks: Checks
) -> Iterator[Event | Unreadable]:
    return parse_archived(progress.offsets(archive.read(window(args)), archive), checks)


class Progress:
    """A progress line on stderr, only when stderr is a terminal; cheap when it is not."""

    def __init__(self, stream: Any | None) -> None:
        self.stream = stream
        self.started = time.perf_counter()
        self._shown = 0.0

    @classmethod
    def on_stderr(cls) -> Progress:
        """A bar on stderr if it is a terminal, else one that shows nothing."""
        return cls(sys.stderr if sys.stderr.isatty() else None)

    def lines(self, stream: BinaryIO, total: int | None) -> Iterable[bytes]:
        """The lines of ``stream``, showing the share of ``total`` bytes read."""
        if self.stream is None:
            return stream
        return self._lines(stream, total)

    def _lines(self, stream: BinaryIO, total: int | None) -> Iterator[bytes]:
        done = 0
        for count, line in enumerate(stream, start=1):
            done += len(line)
            if count % PROGRESS_EVERY == 0:
                self.show(count, done, total)
            yield line

    def offsets(self, messages: Iterator[Archived], archive: Archive) -> Iterator[Archived]:
        """The archived messages, showing how far towards the end offset the read is."""
        if self.stream is None:
            return messages
        return self._offsets(messages, archive)

    def _offsets(self, messages: Iterator[Archived], archive: Archive) -> Iterator[Archived]:
        first = None
        for count, message in enumerate(messages, start=1):
            if first is None:
                first = message.offset
            if count % PROGRESS_EVERY == 0 and archive.end is not None:
                self.show(count, message.offset - first, archive.end - first)
            yield message

    def show(self, count: int, done: int, total: int | None) -> None:
        """Redraw the line, at most ten times a second."""
        now = time.perf_counter()
        if self.stream is None or now - self._shown < 0.1:
            return
        self._shown = now
        rate = count / max(now - self.started, 1e-9)
        bar = ""
        if total:
            share = min(done / total, 1.0)
            filled = int(share * 30)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} "
        self.stream.write(f"\r{bar}{count} events, {rate:,.0f}/s ")
        self.stream.flush()

    def clear(self) -> None:
        """Clear the line (before another message, or at the end)."""
        if self.stream is not None and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def finish(self) -> None:
        """Clear the line for good."""
        self.clear()
        self._shown = 0.0


def _report_rate(read: Read, seconds: float) -> None:
    events = read.replays[0].events
    rate = events / seconds if seconds > 0 else 0.0
    if read.unreadable:
        count = len(read.unreadable)
        more = f"; the first {SHOWN_UNREADABLE} are named above" if count > SHOWN_UNREADABLE else ""
        print(
            f"exitpipe replay: {count} unreadable or refused input(s) skipped{more}",
            file=sys.stderr,
        )
    print(f"{events} events in {seconds:.2f} s ({rate:.0f} events/s)", file=sys.stderr)


# -- showing -----------------------------------------------------------------------------------


def _show(args: argparse.Namespace, read: Read) -> int:
    replays = read.replays
    main = replays[0]
    jobs = [j for j in main.timelines if args.job in (None, j)]
    differences = None
    if len(replays) > 1:
        differences = [d for d in compare(main, replays[1]) if args.job in (None, d.job_id)]
    if args.json:
        # orjson: the standard encoder's indented output is pure Python, and took most of the
        # time a user waited for on a large replay.
        out = orjson.dumps(_as_json(main, jobs, differences, read.unreadable), option=_INDENT)
        sys.stdout.flush()
        sys.stdout.buffer.write(out + b"\n")
    elif differences is not None:
        print(describe_differences(main, replays[1], differences, len(jobs)))
    elif jobs:
        print("\n\n".join(describe_timeline(main, job) for job in jobs))
    if args.job is not None and args.job not in main.timelines:
        # Said, not signalled: exit status 1 means only that the policies differ.
        print(f"exitpipe replay: no event of job {args.job!r} was read", file=sys.stderr)
    return EX_DIFFERENT if differences else EX_OK


def _as_json(
    replay: Replay,
    jobs: list[str],
    differences: list[Difference] | None,
    unreadable: list[Unreadable],
) -> dict[str, object]:
    views = [replay.view(job) for job in jobs]
    out: dict[str, object] = {
        "events": replay.events,
        "policy": {"name": replay.policy.name, "version": replay.policy.version},
        "jobs": [
            {**view.as_json(), "exits": timeline_exits(replay, view.job_id)}
            for view in views
            if view is not None
        ],
        "unreadable": [{"where": u.where, "reason": u.reason} for u in unreadable],
    }
    if differences is not None:
        out["differences"] = [d.as_json() for d in differences]
    return out


def describe_timeline(replay: Replay, job_id: str) -> str:
    """A job's timeline (every event, ignored exits included) and its final status."""
    steps = replay.timelines[job_id]
    view = replay.view(job_id)
    sites = ", ".join(view.sites) if view and view.sites else "unknown (any site may report)"
    live = bool(replay.live)
    headers = ["occurred", "event", "site", "decision", "rule", "outcome", "status", "id"]
    rows = [_step_cells(step) for step in steps]
    if live:
        headers.append("live classifier")
        rows = [[*row, _live(replay, step)] for row, step in zip(rows, steps, strict=True)]
    final = replay.status(job_id)
    return "\n".join(
        [
            f"job {job_id}   sites: {sites}",
            render(headers, rows),
            f"final status: {final.value if final else 'not in the store'} ({_why(view)})",
        ]
    )


def _step_cells(step: Step) -> list[object]:
    event = step.event
    if isinstance(event, ExitEvent):
        rc = f" ({event.return_code})" if event.return_code is not None else ""
        what, site = f"exit {event.effective_code.name}{rc}", event.site
    else:
        what, site = f"lifecycle {event.status.value}", None
    decision = step.decision
    rule = None
    if decision is not None:
        ref = decision.policy
        rule = f"{ref.name}@{ref.version}:{ref.rule}"
    return [
        _second(event.occurred_at),
        what,
        site,
        decision.action.value if decision else None,
        rule,
        step.outcome,
        _status_change(step),
        str(event.event_id)[:8],
    ]


def _second(when: datetime) -> str:
    # isoformat is a third of strftime's cost; strftime kept where they differ (year < 1000).
    return when.isoformat(" ", "seconds")[:19] if when.year >= 1000 else when.strftime(_SECOND)


def _status_change(step: Step) -> str:
    before = step.status_before.value if step.status_before else "new"
    after = step.status_after.value if step.status_after else "new"
    return after if before == after else f"{before} -> {after}"


def _live(replay: Replay, step: Step) -> str | None:
    if not isinstance(step.event, ExitEvent):
        return None
    transition = replay.live.get(step.event.event_id)
    if transition is None:
        return "no transition"
    ref = transition.policy
    return f"{transition.action.value} ({ref.name}@{ref.version}:{ref.rule})"


def _why(view: JobView | None) -> str:
    """The same one line as ``jobs show``, the demo and the dashboard (consumers.explain)."""
    return why(view) if view is not None else "no event of it reached the store"


def describe_differences(
    replay: Replay, other: Replay, differences: list[Difference], jobs: int
) -> str:
    """The jobs that end differently, each with the event and the two rules."""
    a, b = _label(replay.policy), _label(other.policy)
    head = f"{len(differences)} of {jobs} jobs end differently under {a} and {b}"
    if not differences:
        return head
    rows = [_difference_cells(d) for d in differences]
    headers = ["job", f"status ({a})", f"status ({b})", "event", "rule", "other rule", "id"]
    return head + "\n" + render(headers, rows)


def _difference_cells(d: Difference) -> list[object]:
    event = d.step.event if d.step else None
    what = None
    if isinstance(event, ExitEvent):
        rc = f" rc={event.return_code}" if event.return_code is not None else ""
        what = f"{event.site} {event.effective_code.name}{rc}"
    return [
        d.job_id,
        d.status.value if d.status else "not in the store",
        d.other_status.value if d.other_status else "not in the store",
        what,
        _decided(d.step),
        _decided(d.other_step),
        d.event_id[:8] if d.event_id else None,
    ]


def _decided(step: Step | None) -> str | None:
    if step is None or step.decision is None:
        return None
    return f"{step.decision.action.value} by {step.decision.policy.rule}"


def _label(policy: Policy) -> str:
    return f"{policy.name}@{policy.version}"


# -- republishing ------------------------------------------------------------------------------


def _republish(args: argparse.Namespace, settings: Settings, events: list[Any]) -> int:
    names = Names(settings.namespace)
    if not events:
        print("exitpipe replay: nothing to republish", file=sys.stderr)
        return EX_OK
    exits = sum(1 for e in events if isinstance(e, ExitEvent))
    question = (
        f"republish {len(events)} events ({exits} exit, {len(events) - exits} lifecycle) to "
        f"{names.events} and {names.jobs} on {redact(settings.amqp_url)}? [y/N] "
    )
    if not args.yes and not _confirmed(question):
        print("exitpipe replay: nothing republished", file=sys.stderr)
        return EX_OK
    messages = [outgoing(names, event) for event in events]
    try:
        with publisher_for(settings) as publisher:
            outcomes = publisher.publish(messages)
    except BrokerError as exc:
        print(f"exitpipe replay: republish: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    problems = [p for p in map(problem, messages, outcomes) if p is not None]
    for failure in problems:
        print(f"exitpipe replay: republish: {failure}", file=sys.stderr)
    print(f"republished {len(messages) - len(problems)} of {len(messages)} events", file=sys.stderr)
    return EX_UNAVAILABLE if problems else EX_OK


def _confirmed(question: str) -> bool:
    sys.stderr.write(question)
    sys.stderr.flush()
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
