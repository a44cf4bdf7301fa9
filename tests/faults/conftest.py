"""Fixtures of the fault suite: a private RabbitMQ node, a namespace on it, a scenario kit.

The shared broker at 127.0.0.1:5672 is never stopped, killed, alarmed or told to close
connections: every destructive scenario runs against a node of this session's own, started
from the same ``rabbitmq-server`` binary with its own name, ports, data directory and cookie.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producers.broker import declare_topology
from schemas.topology import Names, topology
from tests.conftest import delete_namespace
from tests.faults.harness import RABBIT_BIN, Checker, Daemon, History, RabbitNode, daemon_env


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """A private RabbitMQ node for this session; shut down at the end."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        message = f"no RabbitMQ server binary at {RABBIT_BIN}: the fault suite needs one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
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
