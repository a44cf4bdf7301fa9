"""Fixtures of the cluster suite: a private three-node RabbitMQ cluster for the whole package,
put back in shape before every test, and a namespace per scenario on it."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producers.broker import declare_topology
from schemas.topology import Names, topology
from tests.cluster.harness import PREFIX, SIZE, Cluster, ClusterChecker, reap_stale
from tests.conftest import delete_namespace
from tests.faults.harness import Daemon, History, daemon_env, need_rabbit_server


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    """Three private nodes, clustered; every one of them killed at the end, whatever happens."""
    need_rabbit_server("cluster")
    reap_stale()
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    cluster = Cluster(base)
    atexit.register(cluster.shutdown)  # an interrupted session still stops the nodes
    # A SIGTERM (a CI job cancelled) would end pytest without teardown: make it an interrupt,
    # which runs the teardown below. A SIGKILL leaves the nodes to ``reap_stale`` next run.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"cluster of {SIZE} up in {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        cluster.shutdown()
        atexit.unregister(cluster.shutdown)
        signal.signal(signal.SIGTERM, previous)
        if os.environ.get("EXITPIPE_CLUSTER_KEEP"):  # the nodes' logs, to see what they did
            print(f"cluster data and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(autouse=True)
def healthy(cluster: Cluster) -> None:
    """Each test starts on three running nodes, whatever the test before left behind."""
    cluster.repair()


@dataclass
class ClusterScenario:
    """One namespace on the cluster, a SQLite store and a scratch directory."""

    name: str
    cluster: Cluster
    namespace: str
    store_url: str
    tmp: Path

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    def declare(self, *order: int) -> None:
        """Declare the topology through the nodes in ``order``: its queues' leaders go to the
        first (RabbitMQ's client-local leader locator)."""
        declare_topology(
            self.cluster.urls(*order), topology(self.namespace, quorum_size=SIZE), retry_seconds=60
        )

    def env(self, *order: int, store: str | None = None, **extra: str) -> dict[str, str]:
        urls = self.cluster.urls(*order)
        return daemon_env(urls, self.namespace, store or self.store_url, **extra)

    def daemon(self, command: str, *order: int, log: str | None = None, **extra: str) -> Daemon:
        """``exitpipe COMMAND`` connected through the nodes in ``order``."""
        path = self.tmp / f"{log or command}.log"
        return Daemon(command, self.env(*order, **extra), path)

    def checker(self, history: History, via: int, **extra: object) -> ClusterChecker:
        """The checker, reading the dead letters through node ``via`` (one that is up)."""
        url = self.cluster.node(via).url
        return ClusterChecker(self.name, history, self.store_url, url, extra=dict(extra))


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path
) -> Iterator[ClusterScenario]:
    """A fresh namespace on the cluster (not yet declared) and a SQLite store."""
    ns = f"c-{uuid.uuid4().hex[:10]}"
    name = request.node.name.removeprefix("test_")
    yield ClusterScenario(name, cluster, ns, f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path)
    with contextlib.suppress(Exception):  # a node left down must not hide the real failure
        delete_namespace(cluster.urls(), ns)
