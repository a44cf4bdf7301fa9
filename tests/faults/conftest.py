"""Fixtures of the fault suite: a private RabbitMQ node, a namespace on it, a scenario kit.

The shared broker at 127.0.0.1:5672 is never stopped, killed, alarmed or told to close
connections: every destructive scenario runs against a node of this session's own, started
from the same ``rabbitmq-server`` binary with its own name, ports, data directory and cookie.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from producers.broker import declare_topology
from schemas.topology import Names, topology
from tests.conftest import delete_namespace
from tests.faults.harness import (
    RABBIT_BIN,
    Checker,
    Daemon,
    History,
    RabbitNode,
    daemon_env,
    need_rabbit_server,
)


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """A private RabbitMQ node for this session; shut down at the end."""
    need_rabbit_server("fault")
    base = Path(tempfile.mkdtemp(prefix="exitpipe-faults-rabbit-"))
    node = RabbitNode(base)
    node.start()
    try:
        yield node
    finally:
        node.shutdown()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Scenario:
    """What one scenario needs: its namespace on the private node, a store, a history."""

    name: str
    rabbit: RabbitNode
    namespace: str
    store_url: str
    tmp: Path
    declared_at: float

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def url(self) -> str:
        return self.rabbit.url

    def history(self) -> History:
        return History(self.names)

    def env(
        self, *, amqp_url: str | None = None, store: str | None = None, **extra: str
    ) -> dict[str, str]:
        return daemon_env(amqp_url or self.url, self.namespace, store or self.store_url, **extra)

    def daemon(self, command: str, log: str | None = None, **env: str) -> Daemon:
        amqp_url = env.pop("amqp_url", None)
        store = env.pop("store", None)
        path = self.tmp / f"{log or command}.log"
        return Daemon(command, self.env(amqp_url=amqp_url, store=store, **env), path)

    def checker(self, history: History, store_url: str | None = None) -> Checker:
        return Checker(self.name, history, store_url or self.store_url, self.url)

    def settle_before_crash(self, seconds: float = 4.0) -> None:
        """RabbitMQ 3.10 can lose a quorum queue declared an instant before a hard crash."""
        left = self.declared_at + seconds - time.monotonic()
        if left > 0:
            time.sleep(left)


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, rabbit: RabbitNode, tmp_path: Path
) -> Iterator[Scenario]:
    """A fresh namespace on the private node, its topology declared, and a SQLite store."""
    ns = f"f-{uuid.uuid4().hex[:10]}"
    declare_topology(rabbit.url, topology(ns), retry_seconds=60)
    name = request.node.name.removeprefix("test_")
    yield Scenario(
        name, rabbit, ns, f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path, time.monotonic()
    )
    with contextlib.suppress(Exception):  # a node left down must not hide the real failure
        delete_namespace(rabbit.url, ns)


# -- a namespace with per-role broker users (``exitpipe topology --users``) -------------------

SITES = ("site-a", "site-b")
_CREATED = re.compile(r"^user (?P<user>\S+) \(.*\): created; password (?P<password>\S+)$")


@dataclass
class Secured:
    """A namespace on the private node with its role users, and every output seen."""

    rabbit: RabbitNode
    ns: str
    tmp: Path
    passwords: dict[str, str]
    first_output: str  # the one output allowed to show the generated passwords
    outputs: list[str] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.ns)

    def user(self, role: str) -> str:
        return f"{self.ns}-{role}"

    def url(self, role: str, password: str | None = None) -> str:
        user = self.user(role)
        secret = password if password is not None else self.passwords[user]
        login = f"{quote(user, safe='')}:{quote(secret, safe='')}"
        return f"amqp://{login}@127.0.0.1:{self.rabbit.port}/%2F"

    def env(self, role: str | None = None, **extra: str) -> dict[str, str]:
        url = self.url(role) if role else self.rabbit.url
        store = f"sqlite:///{self.tmp / 'jobs.db'}"
        return daemon_env(url, self.ns, store, EXITPIPE_SPOOL_DIR=str(self.tmp / "spool"), **extra)

    def cli(
        self, *argv: str, role: str | None = None, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """``exitpipe ARGV`` as ``role``'s user (the administrator when None); output kept."""
        env = {**self.env(role, **extra), **_ctl_env(self.rabbit)}
        done = subprocess.run(
            [sys.executable, "-m", "exitpipe.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.outputs += [done.stdout, done.stderr]
        return done


def _ctl_env(rabbit: RabbitNode) -> dict[str, str]:
    """What rabbitmqctl needs to reach the private node: its HOME (the cookie) and RABBITMQ_*."""
    return {
        k: v for k, v in rabbit.env.items() if k == "HOME" or k.startswith(("RABBITMQ_", "ERL_"))
    }


def users_argv(rabbit: RabbitNode) -> list[str]:
    sites = ",".join(SITES)
    return [
        "topology",
        "--users",
        sites,
        "--rabbitmqctl",
        str(RABBIT_BIN / "rabbitmqctl"),
        "-n",
        rabbit.name,
    ]


@pytest.fixture(scope="module")
def secured(rabbit: RabbitNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """``exitpipe topology --users site-a,site-b`` run by the administrator (guest)."""
    ns = f"s-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("security")
    setup = Secured(rabbit, ns, tmp, {}, "")
    done = setup.cli(*users_argv(rabbit))
    assert done.returncode == 0, done.stderr
    setup.outputs.clear()
    setup.first_output = done.stdout + done.stderr
    setup.passwords = {
        m["user"]: m["password"] for m in map(_CREATED.match, done.stdout.splitlines()) if m
    }
    expected = {setup.user(r) for r in ("classifier", "job-state", "server", "operator")}
    expected |= {setup.user(f"site-{s}") for s in SITES}
    assert set(setup.passwords) == expected, done.stdout
    time.sleep(4)  # RabbitMQ 3.10: let the quorum queues settle before any consumer
    yield setup
    for user in expected:
        rabbit.ctl("delete_user", user, check=False)
    with contextlib.suppress(Exception):
        delete_namespace(rabbit.url, ns)
