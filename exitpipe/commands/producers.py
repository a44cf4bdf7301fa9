"""Producer commands: ``topology``, ``report``, ``lifecycle``, ``launch``, ``spool list|flush``.

Exit statuses: 0 done; 1 ``topology --check`` found problems (or a declaration was refused,
or ``rabbitmqctl`` failed for ``--users``); 2 bad arguments or bad input, naming the field;
69 broker unreachable and nothing kept; 75 the event is kept in the local spool for a later
delivery.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
from pydantic import ValidationError

from exitpipe.cli import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE
from exitpipe.settings import Settings, quorum_size, topology_of
from producers import replicas
from producers.broker import check_topology, declare_topology
from producers.connection import first_url
from producers.deliver import Delivery, Status, deliver
from producers.errors import BrokerError, TopologyMismatch, redact
from producers.launch import Report, WorkerExit, exit_event, launch
from producers.publisher import Publisher, outgoing
from producers.spool import Spool
from producers.users import Rabbitmqctl, UsersError, check_sites, grants, script, site_user
from schemas.codes import Launcher
from schemas.events import (
    EXIT_SCHEMA,
    LIFECYCLE_SCHEMA,
    BadMessage,
    Event,
    ExitEvent,
    describe,
    parse_object,
)
from schemas.topology import Names, Topology

EX_PROBLEMS = 1
CONNECT_TIMEOUT = 5.0  # one connection attempt; never more than the whole retry budget
_STATUS = {Status.DELIVERED: EX_OK, Status.SPOOLED: EX_TEMPFAIL, Status.LOST: EX_UNAVAILABLE}

LAUNCH_EPILOG = """\
The worker's stdin, stdout and stderr are its own; SIGTERM and SIGINT sent to launch are
forwarded to it. Its exit maps to a code as FLARE's process launcher does (0 SUCCESS,
1 EXECUTION_ERROR, 9 ABORTED, anything else EXECUTION_ERROR) except that 101, 102 and 103 stay
EXCEPTION, UNSAFE_COMPONENT and CONFIG_ERROR, and a worker stopped through launch is ABORTED.
With --rc-file, an integer the worker wrote there during this run is the return code
reported (and mapped) instead of the process's own.

Exit status: the worker's own (128+N after death by signal N), also when the exit event
could only be kept in the local spool, which stderr then says (`exitpipe spool flush`
delivers it later); 2 for bad arguments, before the worker is started.
"""


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the producer commands to the ``exitpipe`` parser."""
    _add_topology(subparsers, common)
    _add_report(subparsers, common)
    _add_lifecycle(subparsers, common)
    _add_launch(subparsers, common)
    _add_spool(subparsers, common)


def _add_topology(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "topology", parents=[common], help="declare (or check) the namespace's exchanges and queues"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check; exit 1 on any problem. Also lists each quorum queue's and the"
        " archive's leader and members, read with rabbitmqctl (--rabbitmqctl, -n)",
    )
    users = parser.add_argument_group(
        "broker users per role (see README, Security): <ns>-classifier, <ns>-job-state,"
        " <ns>-server and <ns>-site-<site>; passwords from EXITPIPE_PASSWORD_<ROLE>"
        " (e.g. EXITPIPE_PASSWORD_SITE_SITE_A), else generated and printed once"
    )
    users.add_argument(
        "--users",
        nargs="?",
        const="",
        metavar="SITES",
        help="after declaring, create the users (comma-separated sites) with rabbitmqctl",
    )
    users.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="with --users: only print the rabbitmqctl commands (a shell script), change nothing",
    )
    users.add_argument(
        "--rabbitmqctl",
        default="rabbitmqctl",
        metavar="PATH",
        help="the rabbitmqctl to run (default: rabbitmqctl on PATH)",
    )
    users.add_argument(
        "-n", "--node", help="the RabbitMQ node rabbitmqctl talks to (--users, --check)"
    )
    users.add_argument(
        "--vhost", help="virtual host of the permissions or queues (default: the first URL's)"
    )
    parser.set_defaults(func=_topology)


def _add_report(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "report", parents=[common], help="publish one exit event; prints its event id"
    )
    _job_and_site(parser)
    parser.add_argument("--code", help="code name (optional with --return-code)")
    parser.add_argument("--return-code", type=int, help="the raw integer the launcher saw")
    parser.set_defaults(func=_report)


def _add_lifecycle(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "lifecycle", parents=[common], help="publish a job lifecycle event; prints its event id"
    )
    parser.add_argument("--job", required=True, help="job id")
    parser.add_argument("--status", required=True, help="e.g. RUNNING or FINISHED:COMPLETED")
    parser.add_argument("--sites", help="the job's client sites, comma-separated")
    parser.set_defaults(func=_lifecycle)


def _add_launch(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "launch",
        parents=[common],
        help="run a worker, report its exit, exit with its status",
        usage="exitpipe launch --job J --site S [options] -- CMD...",
        epilog=LAUNCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _job_and_site(parser)
    parser.add_argument("--rc-file", help="file the worker may write its return code to")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the worker, after --")
    parser.set_defaults(func=_launch)


def _add_spool(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("spool", help="events kept locally while the broker was away")
    actions = parser.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="show the spooled events")
    listing.set_defaults(func=_spool_list)
    flush = actions.add_parser(
        "flush", parents=[common], help="deliver them; exit 75 if any remain"
    )
    flush.set_defaults(func=_spool_flush)


def _job_and_site(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", required=True, help="job id")
    parser.add_argument("--site", required=True, help="client site name")
    parser.add_argument(
        "--launcher", default=Launcher.PROCESS.value, help="process | docker | k8s | other"
    )
    parser.add_argument("--reason", help="free text, at most 4,096 characters")


def _topology(args: argparse.Namespace, settings: Settings) -> int:
    if args.users is None and args.print_only:
        return _fail("topology", "--print goes with --users", EX_USAGE)
    if args.users is None and not args.check and (args.node or args.vhost):
        return _fail("topology", "--node and --vhost go with --users or --check", EX_USAGE)
    if args.users is not None and args.check:
        return _fail("topology", "--check and --users do not go together", EX_USAGE)
    if args.users is not None:
        sites = [s.strip() for s in args.users.split(",") if s.strip()]
        try:
            check_sites(sites)
        except ValueError as exc:
            return _fail("topology", exc, EX_USAGE)
        ctl = _ctl(args)
        vhost = args.vhost or _vhost(settings)
        if args.print_only:
            print(script(grants(settings.namespace, sites), vhost, ctl), end="")
            return EX_OK
    _quiet_pika()
    topo = topology_of(settings)
    url, retry, ca_file = settings.amqp_url, settings.retry_seconds, settings.amqp_ca_file
    try:
        if args.check:
            problems = check_topology(url, topo, retry_seconds=retry, ca_file=ca_file)
            return _print_problems(problems + _members(args, settings, topo))
        only_checked = declare_topology(url, topo, retry_seconds=retry, ca_file=ca_file)
    except TopologyMismatch as exc:
        return _fail("topology", exc, EX_PROBLEMS)
    except BrokerError as exc:
        return _fail("topology", exc, EX_UNAVAILABLE)
    if only_checked:
        bindings = sum(1 for item in only_checked if item.startswith("binding "))
        print(
            "exitpipe topology: this broker user may not configure: checked that"
            f" {len(only_checked) - bindings} exchanges and queues exist instead, and left"
            f" {bindings} bindings unchecked (run `exitpipe topology` as an administrator)",
            file=sys.stderr,
        )
    print(f"declared namespace {settings.namespace} on {redact(settings.amqp_url)}")
    if args.users is None:
        return EX_OK
    return _users(settings.namespace, sites, vhost, ctl)


def _users(ns: str, sites: list[str], vhost: str, ctl: list[str]) -> int:
    """Create the role users; a generated password is printed here once, and nowhere else."""
    try:
        applied = Rabbitmqctl(ctl).apply(grants(ns, sites), vhost)
    except UsersError as exc:
        return _fail("topology --users", exc, EX_PROBLEMS)
    for a in applied:
        if a.password is not None:
            said = f"created; password {a.password}"
        elif a.created:
            said = f"created; password from {a.password_from}"
        elif a.password_from:
            said = f"exists; password set from {a.password_from}"
        else:
            said = "exists; password unchanged"
        print(f"user {a.grant.user} ({a.grant.role}): {said}")
    if any(a.password is not None for a in applied):
        print("the generated passwords are shown this once and kept nowhere: store them now")
    return EX_OK


def _ctl(args: argparse.Namespace) -> list[str]:
    return [args.rabbitmqctl, *(["-n", args.node] if args.node else [])]


def _vhost(settings: Settings) -> str:
    return str(pika.URLParameters(first_url(settings.amqp_url)).virtual_host)


def _members(args: argparse.Namespace, settings: Settings, topo: Topology) -> list[str]:
    """Print each replicated queue's leader and members (rabbitmqctl); the problems found."""
    try:
        found = replicas.read(Rabbitmqctl(_ctl(args)), args.vhost or _vhost(settings))
    except UsersError as exc:
        print(f"exitpipe topology: members and leaders not shown: {exc}", file=sys.stderr)
        return []
    lines, problems = replicas.report(topo, found, quorum_size(settings))
    for line in lines:
        print(line)
    return problems


def _print_problems(problems: list[str]) -> int:
    for problem in problems:
        print(problem)
    return EX_PROBLEMS if problems else EX_OK


def _report(args: argparse.Namespace, settings: Settings) -> int:
    fields = {
        "schema": EXIT_SCHEMA,
        "job_id": args.job,
        "site": args.site,
        "launcher": args.launcher,
        "code": args.code.upper() if args.code else None,
        "return_code": args.return_code,
        "reason": args.reason,
    }
    return _publish("report", _event(fields), settings)


def _lifecycle(args: argparse.Namespace, settings: Settings) -> int:
    fields = {
        "schema": LIFECYCLE_SCHEMA,
        "job_id": args.job,
        "status": args.status,
        "sites": args.sites.split(",") if args.sites is not None else None,
    }
    return _publish("lifecycle", _event(fields), settings)


def _event(fields: dict[str, Any]) -> Event | BadMessage:
    """The event these fields make, or the BadMessage naming the bad field."""
    fields.update(event_id=str(uuid.uuid4()), occurred_at=datetime.now(UTC).isoformat())
    try:
        return parse_object({k: v for k, v in fields.items() if v is not None})
    except BadMessage as exc:
        return exc


def _publish(command: str, event: Event | BadMessage, settings: Settings) -> int:
    if isinstance(event, BadMessage):
        return _fail(command, event.reason, EX_USAGE)
    if problem := _not_permitted(event, settings):
        return _fail(command, problem, EX_USAGE)
    _quiet_pika()
    try:
        publisher = publisher_for(settings)
    except BrokerError as exc:
        return _fail(command, exc, EX_USAGE)
    with publisher:
        message = outgoing(Names(settings.namespace), event)
        delivery = deliver(publisher, Spool(settings.spool_dir), [message])
    if delivery.status is not Status.LOST:
        print(event.event_id)
    return _explain(command, delivery, settings)


def _launch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        return _fail("launch", "give the worker's command after --", EX_USAGE)
    try:
        launcher = Launcher(args.launcher)
        event = exit_event(args.job, args.site, launcher, WorkerExit(0), args.reason)
        if problem := _not_permitted(event, settings):  # before the worker is started
            return _fail("launch", problem, EX_USAGE)
        publisher = publisher_for(settings)
    except ValueError as exc:
        choices = ", ".join(item.value for item in Launcher)
        text = describe(exc) if isinstance(exc, ValidationError) else f"launcher: one of {choices}"
        return _fail("launch", text, EX_USAGE)
    except BrokerError as exc:
        return _fail("launch", exc, EX_USAGE)
    _quiet_pika()
    report = Report(Names(settings.namespace), publisher, Spool(settings.spool_dir))
    with publisher:
        return launch(
            command,
            job=args.job,
            site=args.site,
            launcher=launcher,
            reason=args.reason,
            report=report,
            rc_file=Path(args.rc_file) if args.rc_file else None,
        )


def _not_permitted(event: Event, settings: Settings) -> str | None:
    """Why the URL's role user may not publish ``event``, before anything is spooled.

    The broker refuses it anyway (permissions, topic permissions: ``producers/users.py``);
    refusing here keeps such an event out of the spool, where it would be refused again at
    every later flush. Users outside the role naming of this namespace are not judged here.
    """
    try:
        user = pika.URLParameters(first_url(settings.amqp_url)).credentials.username
    except Exception:  # a bad URL is reported by the publisher, with its own message
        return None
    ns = settings.namespace
    prefix = site_user(ns, "")
    exit_ = isinstance(event, ExitEvent)
    if not isinstance(user, str):
        return None
    if user.startswith(prefix):
        site = user.removeprefix(prefix)
        if not exit_:
            return f"broker user {user!r} is the user of site {site!r}: it may only report exits"
        assert isinstance(event, ExitEvent)
        if event.site != site:
            return f"site: {event.site!r} is not the site of broker user {user!r} ({site!r})"
    elif user == f"{ns}-server" and exit_:
        return f"broker user {user!r} is the server's: it may not report exits (a site's may)"
    elif user in (f"{ns}-classifier", f"{ns}-job-state"):
        return f"broker user {user!r} is a daemon's: it may not publish events"
    return None


def _spool_list(args: argparse.Namespace, settings: Settings) -> int:
    spool = Spool(settings.spool_dir)
    pending = spool.pending()
    for path, message in pending:
        print(f"{path.name}\t{message.exchange}\t{message.routing_key}\t{message.message_id}")
    print(f"{len(pending)} event(s) in {spool.directory}", file=sys.stderr)
    return EX_OK


def _spool_flush(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_pika()
    try:
        publisher = publisher_for(settings)
    except BrokerError as exc:
        return _fail("spool flush", exc, EX_USAGE)
    with publisher:
        delivery = deliver(publisher, Spool(settings.spool_dir))
    for problem in delivery.problems:
        print(f"exitpipe spool flush: {problem}", file=sys.stderr)
    print(f"delivered {delivery.confirmed}, {delivery.waiting} left in {settings.spool_dir}")
    return EX_TEMPFAIL if delivery.waiting else EX_OK


def publisher_for(settings: Settings) -> Publisher:
    """A publisher configured from the settings (broker, heartbeat, retry budget, TLS)."""
    return Publisher(
        settings.amqp_url,
        heartbeat=settings.heartbeat,
        retry_seconds=settings.retry_seconds,
        connect_timeout=min(CONNECT_TIMEOUT, settings.retry_seconds),
        ca_file=settings.amqp_ca_file,
    )


def _explain(command: str, delivery: Delivery, settings: Settings) -> int:
    for problem in delivery.problems:
        print(f"exitpipe {command}: {problem}", file=sys.stderr)
    if delivery.status is Status.SPOOLED:
        print(
            f"exitpipe {command}: the event is kept in the spool {settings.spool_dir};"
            " `exitpipe spool flush` delivers it",
            file=sys.stderr,
        )
    elif delivery.status is Status.LOST:
        print(f"exitpipe {command}: the event could not be published nor kept", file=sys.stderr)
    elif delivery.waiting:
        print(
            f"exitpipe {command}: {delivery.waiting} older event(s) wait in the spool",
            file=sys.stderr,
        )
    return _STATUS[delivery.status]


def _fail(command: str, problem: object, status: int) -> int:
    print(f"exitpipe {command}: {problem}", file=sys.stderr)
    return status


def _quiet_pika() -> None:
    """pika logs every failed connect at ERROR; our own messages say what matters."""
    logging.basicConfig(level=logging.WARNING, format="exitpipe: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
