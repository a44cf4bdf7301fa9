"""Broker users per role, and the ``rabbitmqctl`` adapter that creates them (DESIGN 4, 6).

``grants(ns, sites)`` is pure: the users of one namespace and what each may do. Every user
configures nothing (an administrator declares the topology); each writes and reads only what
its role needs, and topic permissions pin the routing keys it may publish with:

====================  =================  ===========================  ==================
user                  read               write (exchange: keys)       configure
====================  =================  ===========================  ==================
<ns>-site-<site>      nothing            <ns>.events: exit.<site>     nothing
<ns>-server           nothing            <ns>.jobs: lifecycle.*       nothing
<ns>-classifier       <ns>.classify      <ns>.jobs: transition.fail   nothing
                                         or .stop; <ns>.dead
<ns>-job-state        <ns>.job-state     <ns>.dead                    nothing
<ns>-operator         <ns>.dead-letters  <ns>.events, <ns>.jobs       nothing
                      <ns>.archive       (any key: dead requeue)
====================  =================  ===========================  ==================

The operator runs ``exitpipe dead``, ``replay`` and ``jobs show``; a dead letter it requeues
keeps its original sender in ``x-exitpipe-sender``, which the consumers believe from this
user only (``consumers.senders``).

``Rabbitmqctl`` applies them idempotently on a node: a missing user is created, an existing
one keeps its password unless ``EXITPIPE_PASSWORD_<ROLE>`` gives one, and permissions are set
(``set_permissions`` and ``set_topic_permissions`` overwrite). A password goes to
``rabbitmqctl`` on its standard input, never in its arguments (which ``ps`` shows), and is
never logged: a generated one is returned to the caller, which prints it once.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.topology import Names

PASSWORD_PREFIX = "EXITPIPE_PASSWORD_"
NOTHING = "^$"  # RabbitMQ's pattern for "no resource at all"
_SITE_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # DESIGN 3's site names
MAX_SITES = 1000


class UsersError(Exception):
    """A user or a permission could not be set; the message never carries a password."""


@dataclass(frozen=True)
class TopicGrant:
    """Routing keys a user may publish with (``write``) on one topic exchange."""

    exchange: str
    write: str
    read: str = NOTHING


@dataclass(frozen=True)
class Grant:
    """One broker user and everything it may do."""

    user: str
    role: str
    configure: str
    write: str
    read: str
    topics: tuple[TopicGrant, ...] = field(default=())

    @property
    def password_variable(self) -> str:
        """The environment variable that may hold this user's password."""
        return PASSWORD_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", self.role).upper()


def _exact(*names: str) -> str:
    """A pattern that matches exactly these resource names."""
    escaped = [re.escape(n) for n in names]
    return f"^{escaped[0]}$" if len(escaped) == 1 else f"^({'|'.join(escaped)})$"


def new_password() -> str:
    """A random password that no command line can take for an option: never a leading '-'."""
    while True:
        password = secrets.token_urlsafe(24)
        if not password.startswith("-"):
            return password


def site_user(ns: str, site: str) -> str:
    """The broker user of one site: ``<ns>-site-<site>`` (the classifier relies on it)."""
    return Names(ns).site_user(site)


def check_sites(sites: Sequence[str]) -> list[str]:
    """The sites, validated as DESIGN 3 validates an exit's ``site``; ValueError otherwise."""
    if len(sites) > MAX_SITES:
        raise ValueError(f"sites: {len(sites)} given, at most {MAX_SITES}")
    for site in sites:
        if not _SITE_RE.fullmatch(site):
            raise ValueError(
                f"sites: {site[:140]!r} must be 1 to 128 characters of letters, digits,"
                " '.', '_', '-' and ':'"
            )
    if len(set(sites)) != len(sites):
        raise ValueError("sites: a site is given twice")
    return list(sites)


def grants(ns: str, sites: Sequence[str]) -> list[Grant]:
    """The users of namespace ``ns``: one per daemon, the server, and one per site."""
    n = Names(ns)
    fixed = [
        Grant(
            n.classifier_user,
            "classifier",
            NOTHING,
            _exact(n.jobs, n.dead),
            _exact(n.classify),
            (TopicGrant(n.jobs, r"^transition\.(fail|stop)$"),),
        ),
        Grant(n.job_state_user, "job-state", NOTHING, _exact(n.dead), _exact(n.job_state)),
        Grant(
            n.operator_user,
            "operator",
            NOTHING,
            _exact(n.events, n.jobs),
            _exact(n.dead_letters, n.archive),
            (TopicGrant(n.events, ".*"), TopicGrant(n.jobs, ".*")),
        ),
        Grant(
            n.server_user,
            "server",
            NOTHING,
            _exact(n.jobs),
            NOTHING,
            (TopicGrant(n.jobs, r"^lifecycle\.[A-Z_.]+$"),),
        ),
    ]
    per_site = [
        Grant(
            site_user(ns, site),
            f"site {site}",
            NOTHING,
            _exact(n.events),
            NOTHING,
            (TopicGrant(n.events, f"^exit\\.{re.escape(site)}$"),),
        )
        for site in check_sites(sites)
    ]
    return fixed + per_site


def _argv(grant: Grant, vhost: str) -> list[list[str]]:
    """The ``rabbitmqctl`` arguments that set a user's permissions (not its password)."""
    out = [["set_permissions", "-p", vhost, grant.user, grant.configure, grant.write, grant.read]]
    out += [
        ["set_topic_permissions", "-p", vhost, grant.user, t.exchange, t.write, t.read]
        for t in grant.topics
    ]
    return out


def script(all_grants: Sequence[Grant], vhost: str, ctl: Sequence[str]) -> str:
    """A POSIX shell script that creates the users elsewhere (``topology --users --print``).

    Passwords are read from the ``EXITPIPE_PASSWORD_*`` variables when it runs: the script
    itself holds none, and ``rabbitmqctl`` reads each from its standard input.
    """
    prefix = " ".join(shlex.quote(a) for a in ctl)
    lines = [
        "#!/bin/sh",
        "# exitpipe broker users; set the password variables first. add_user fails for a user",
        "# that exists: use `change_password` instead (it also reads standard input).",
        "set -e",
    ]
    for g in all_grants:
        lines.append(f"# {g.role}")
        lines.append(
            f"printf '%s\\n' \"${g.password_variable}\" | {prefix} add_user {shlex.quote(g.user)}"
        )
        lines += [f"{prefix} {shlex.join(argv)}" for argv in _argv(g, vhost)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Applied:
    """What ``Rabbitmqctl.apply`` did for one user; ``password`` only when it generated one."""

    grant: Grant
    created: bool
    password_from: str | None  # the variable that set the password, if any
    password: str | None = field(default=None, repr=False)


class Rabbitmqctl:
    """Runs ``rabbitmqctl [-n NODE] ...``; a failure is a UsersError with its output."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.command = list(command)
        self._env = dict(env) if env is not None else None

    def run(self, *args: str, stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [*self.command, *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=self._env,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UsersError(f"{self.command[0]} {args[0]}: {exc}") from exc
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise UsersError(f"{self.command[0]} {args[0]}: {' '.join(why[-3:])}")
        return done.stdout

    def users(self) -> set[str]:
        """The names of the node's users."""
        out = self.run("list_users", "--quiet", "--no-table-headers")
        return {line.split("\t")[0] for line in out.splitlines() if line.strip()}

    def apply(
        self, all_grants: Sequence[Grant], vhost: str, environ: Mapping[str, str] = os.environ
    ) -> list[Applied]:
        """Create the missing users and set every permission; idempotent."""
        _no_shared_variable(all_grants, environ)
        existing = self.users()
        done = []
        for g in all_grants:
            given = environ.get(g.password_variable) or None
            generated = None if given else new_password()
            created = g.user not in existing
            if created:
                self.run("add_user", g.user, stdin=f"{given or generated}\n")
            elif given:
                self.run("change_password", g.user, stdin=f"{given}\n")
            for argv in _argv(g, vhost):
                self.run(*argv)
            source = g.password_variable if given else None
            done.append(Applied(g, created, source, generated if created else None))
        return done


def _no_shared_variable(all_grants: Sequence[Grant], environ: Mapping[str, str]) -> None:
    """Two users must never get one password because their sites map to one variable."""
    seen: dict[str, str] = {}
    for g in all_grants:
        other = seen.setdefault(g.password_variable, g.user)
        if other != g.user and environ.get(g.password_variable):
            raise UsersError(
                f"users {other} and {g.user} would share the password of"
                f" {g.password_variable}: give them separately (rename a site)"
            )
