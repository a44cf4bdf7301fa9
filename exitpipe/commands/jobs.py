"""``exitpipe jobs show J`` and ``exitpipe jobs list``: what the store says, and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from consumers.archive import Window
from consumers.explain import why
from consumers.policy import PolicyError, load_policy
from consumers.replay import Checks, job_exits, parse_archived
from consumers.state import HistoryRow
from consumers.store import JobView, StoreError
from consumers.store.factory import open_store
from exitpipe.commands.archive import open_archive
from exitpipe.commands.table import render
from exitpipe.settings import Settings
from producers.errors import BrokerError
from schemas.codes import JobStatus
from schemas.events import ExitEvent
from schemas.topology import Names


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``jobs show`` and ``jobs list``."""
    jobs = subparsers.add_parser("jobs", help="job statuses and histories from the store")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    show = sub.add_parser("show", parents=[common], help="one job's status and history")
    show.add_argument("job_id", metavar="JOB")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=show_job)
    lst = sub.add_parser("list", parents=[common], help="every job's status")
    lst.add_argument("--status", type=_status, help="only jobs in this status")
    lst.add_argument("--limit", type=int, help="at most this many jobs")
    lst.add_argument(
        "--disagreements",
        action="store_true",
        help="only jobs whose server verdict (server_status) differs from their status",
    )
    lst.add_argument("--json", action="store_true", help="a JSON list")
    lst.set_defaults(func=list_jobs)


def _status(text: str) -> JobStatus:
    try:
        return JobStatus(text)
    except ValueError:
        names = ", ".join(s.value for s in JobStatus)
        raise argparse.ArgumentTypeError(f"status: {text!r} is not one of {names}") from None


def show_job(args: argparse.Namespace, settings: Settings) -> int:
    """Print one job; exit 1 when the store does not know it."""
    try:
        store = open_store(settings.store)
        try:
            job = store.get(args.job_id)
        finally:
            store.close()
    except StoreError as exc:
        print(f"exitpipe: {exc}", file=sys.stderr)
        return 2
    if job is None:
        print(f"exitpipe: job {args.job_id!r} is not in the store", file=sys.stderr)
        return 1
    exits = archived_exits(settings, job.job_id)
    if args.json:
        print(json.dumps({**job.as_json(), "exits": exits}, indent=2))
    else:
        print(describe_job(job, exits))
    return 0


def archived_exits(settings: Settings, job_id: str) -> list[dict[str, object]]:
    """The job's exit events from the archive, decided by the configured policy.

    The archive is where exitpipe keeps exits the policy ignored (they never reach the store).
    It is read with the live sender checks, so a refused spoof is not shown as an exit. When
    the broker cannot be reached the exits are left out, and stderr says so.
    """
    try:
        policy = load_policy(settings.policy)
        return job_exits(archived_exit_events(settings, job_id), job_id, policy)
    except (BrokerError, PolicyError) as exc:
        print(f"exitpipe: exits left out: {exc}", file=sys.stderr)
        return []


def archived_exit_events(settings: Settings, job_id: str) -> list[ExitEvent]:
    """The job's exit events as the archive holds them, oldest first; BrokerError if unread."""
    archive = open_archive(settings, retry_seconds=min(settings.retry_seconds, 5.0))
    checks = Checks(Names(settings.namespace), settings.require_site_user)
    return [
        item
        for item in parse_archived(archive.read(Window()), checks)
        if isinstance(item, ExitEvent) and item.job_id == job_id
    ]


def describe_job(job: JobView, exits: list[dict[str, object]] | None = None) -> str:
    """A job's status, sites, the one-line why, and its history as a readable table."""
    sites = ", ".join(job.sites) if job.sites else "unknown (any site may report)"
    head = f"job {job.job_id}: {job.status.value if job.status else '-'}   sites: {sites}"
    server = job.server_status
    if server is not None:
        agree = "agrees" if server == job.status else "DISAGREES"
        head += f"\nserver verdict: {server.value} ({agree})"
    head += f"\nwhy: {why(job)}"
    rows = [_history_cells(r) for r in job.history]
    headers = [
        "occurred",
        "kind",
        "site",
        "code (rc)",
        "action",
        "rule",
        "outcome",
        "status",
        "dup",
        "event",
    ]
    text = head + "\n" + render(headers, rows)
    if exits:
        cells = [
            [e["occurred_at"], e["site"], e["code"], e["return_code"], e["stage"], e["decision"],
             e["rule"], str(e["event_id"])[:8]]
            for e in exits
        ]  # fmt: skip
        heads = ["occurred", "site", "code", "rc", "stage", "decision", "rule", "event"]
        text += "\n\nexits (from the archive):\n" + render(heads, cells)
    return text


def _history_cells(row: HistoryRow) -> list[object]:
    code = f"{row.code} ({row.return_code})" if row.return_code is not None else row.code
    rule = f"{row.policy.name}@{row.policy.version}:{row.policy.rule}" if row.policy else None
    before = row.status_before.value if row.status_before else "new"
    after = row.status_after.value if row.status_after else "-"
    status = after if before == after else f"{before} -> {after}"
    return [
        row.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
        row.kind,
        row.site,
        code,
        row.action,
        rule,
        row.outcome.value,
        status,
        row.duplicates or None,
        row.event_id[:8],
    ]


def list_jobs(args: argparse.Namespace, settings: Settings) -> int:
    """Print every job's status (or the first ``--limit``)."""
    try:
        store = open_store(settings.store)
        try:
            jobs = store.list(
                status=args.status, limit=args.limit, disagreements=args.disagreements
            )
        finally:
            store.close()
    except StoreError as exc:
        print(f"exitpipe: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([j.as_json() for j in jobs], indent=2))
        return 0
    rows = [
        [
            j.job_id,
            j.status.value if j.status else None,
            (j.server_status.value + (" (differs)" if j.disagrees else ""))
            if j.server_status
            else None,
            j.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for j in jobs
    ]
    print(render(["job", "status", "server verdict", "updated"], rows))
    return 0
