"""Failover on the three-node cluster, under load, checked as the fault suite checks: lost 0,
duplicate effects 0, wrong final states 0; each scenario also measures ``resume_s``, the
seconds from the fault until the store recorded the first event published after it.

Nodes are numbered 1 to 3. Each scenario picks the node that leads the work queues (the one
the topology is declared through), the one the daemons use first and the producer's. Through
all of them, launchers run ``exitpipe launch`` one after another on URL lists of proxies in
front of the nodes; the last test checks that none of them had to spool, then makes every
node unreachable, where they must spool, and delivers the spool once a node answers.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consumers.store.factory import open_store
from consumers.store.memory import MemoryStore
from producers.broker import declare_topology
from producers.launch import map_exit
from schemas.topology import topology
from tests.cluster.conftest import ClusterScenario
from tests.cluster.harness import (
    LAUNCH_SITE,
    PARTITION_SECONDS,
    SIZE,
    Cluster,
    Launch,
    Launchers,
    TimedHistory,
    launch,
    record,
)
from tests.conftest import delete_namespace
from tests.faults.harness import (
    Daemon,
    Producer,
    daemon_env,
    daemons,
    exit_event,
    flat,
    row_event,
    wait_for,
    workload,
)
from tests.support.proxy import Proxy

pytestmark = pytest.mark.cluster
JOBS = 300
# Does the fault; returns when it struck (wall clock) and what to add to the JSON line.
Fault = Callable[[], tuple[float, dict[str, Any]]]


def under_load(
    scenario: ClusterScenario, *, leader: int, daemons_on: int, producer_on: int, fault: Fault
) -> dict[str, Any]:
    """Declare with queue leaders on ``leader``; run the daemons first connected to
    ``daemons_on`` and a producer to ``producer_on`` (each with every node listed); do the
    fault a fifth of the way through; check and record."""
    cluster = scenario.cluster
    scenario.declare(*_order(leader))
    declared = time.monotonic()
    history = TimedHistory(scenario.names)
    events = flat(workload(JOBS))
    with daemons(scenario.daemon("run", *_order(daemons_on))):
        producer = Producer(
            cluster.urls(*_order(producer_on)), history, events, chunk=10, pause=0.1,
            retry_seconds=30,
        )  # fmt: skip
        producer.start()
        wait_for(lambda: producer.sent >= len(events) // 5, 120, "a fifth of the load")
        # RabbitMQ 3.10 can lose a quorum queue declared an instant before a hard crash.
        time.sleep(max(0.0, declared + 4 - time.monotonic()))
        at, extra = fault()
        producer.finish(300)
        checker = scenario.checker(history, via=producer_on, **extra)
        return checker.check(history, at)


def _order(first: int) -> tuple[int, ...]:
    """Every node, starting with ``first``."""
    return tuple((first - 1 + i) % SIZE + 1 for i in range(SIZE))


# -- launchers, through every scenario of this module ------------------------------------------


@dataclass
class LaunchPool:
    """Launchers through proxies in front of each node, and the daemons of their namespace."""

    cluster: Cluster
    namespace: str
    store_url: str
    tmp: Path
    proxies: list[Proxy]
    launchers: Launchers
    faults: list[str] = field(default_factory=list)

    def env(self, urls: str) -> dict[str, str]:
        return daemon_env(urls, self.namespace, self.store_url, EXITPIPE_SPOOL_DIR=str(self.spool))

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"

    def every_proxy(self) -> str:
        return ",".join(p.url(n.url) for p, n in zip(self.proxies, self.cluster.nodes, strict=True))


@pytest.fixture(scope="module")
def launchers(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchPool]:
    """Launchers (and their namespace's daemons) running from the first test that asks for them
    to the last test of the module."""
    ns = f"l-{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("launchers")
    store_url = f"sqlite:///{tmp / 'jobs.db'}"
    declare_topology(cluster.urls(), topology(ns, quorum_size=SIZE), retry_seconds=60)
    proxies = [Proxy("127.0.0.1", node.port).start() for node in cluster.nodes]
    lists = [
        ",".join(proxies[n - 1].url(cluster.node(n).url) for n in _order(first))
        for first in range(1, SIZE + 1)
    ]
    env = daemon_env("", ns, store_url, EXITPIPE_SPOOL_DIR=str(tmp / "spool"))
    pool = LaunchPool(cluster, ns, store_url, tmp, proxies, Launchers(env, lists))
    daemon = Daemon("run", daemon_env(cluster.urls(2, 3, 1), ns, store_url), tmp / "run.log")
    daemon.start()
    pool.launchers.start()
    try:
        yield pool
    finally:
        with contextlib.ExitStack() as cleanup:  # every step runs, whichever fails
            cleanup.callback(_quietly, delete_namespace, cluster.urls(), ns)
            for proxy in proxies:
                cleanup.callback(proxy.close)
            cleanup.callback(lambda: daemon.alive() and daemon.stop())
            with contextlib.suppress(AssertionError):
                pool.launchers.finish()


def _quietly(step: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(Exception):  # a node left down must not hide the real failure
        step(*args)


# -- the scenarios --------------------------------------------------------------------------------


def test_sigkill_the_node_the_daemons_use(scenario: ClusterScenario, launchers: LaunchPool) -> None:
    """The daemons' node dies mid-stream: they go on through the next node of their list."""
    cluster = scenario.cluster
    restarted: list[Any] = []

    def kill_node_1() -> tuple[float, dict[str, Any]]:
        at = time.time()
        cluster.node(1).kill()
        restarted.append(cluster.restart_later(cluster.node(1)))
        launchers.faults.append("kill c1 (the daemons' node)")
        return at, {"fault": "SIGKILL c1, the daemons' node; queue leaders on c2"}

    under_load(scenario, leader=2, daemons_on=1, producer_on=3, fault=kill_node_1)
    restarted[0].join(120)


def test_sigkill_the_leader_of_the_work_queues_then_restart_it(
    scenario: ClusterScenario, launchers: LaunchPool
) -> None:
    """The node that leads both work queues dies and comes back: followers elect a leader."""
    cluster, names = scenario.cluster, scenario.names
    restarted: list[Any] = []

    def kill_leader() -> tuple[float, dict[str, Any]]:
        leader = cluster.leader(names.classify)
        assert leader is cluster.node(1) and cluster.leader(names.job_state) is leader
        at = time.time()
        leader.kill()
        restarted.append(cluster.restart_later(leader))
        launchers.faults.append("kill c1 (the queue leader)")
        return at, {"fault": "SIGKILL c1, leader of both work queues, then restart; daemons on c2"}

    line = under_load(scenario, leader=1, daemons_on=2, producer_on=3, fault=kill_leader)
    restarted[0].join(120)
    record(
        {
            "scenario": f"{line['scenario']}:leaders_after",
            "classify": str(cluster.leader(names.classify)),
            "job_state": str(cluster.leader(names.job_state)),
        }
    )


def test_partition_one_node_then_heal(scenario: ClusterScenario, launchers: LaunchPool) -> None:
    """The daemons' node, which also leads the queues, is cut off (SIGSTOP past the net tick
    time), then resumes: the others carry on without it, autoheal takes it back."""
    cluster = scenario.cluster

    def cut_node_1() -> tuple[float, dict[str, Any]]:
        node = cluster.node(1)
        at = time.time()
        node.pause()
        launchers.faults.append("partition c1")
        time.sleep(PARTITION_SECONDS)
        healed, restarted = cluster.heal(node)
        return at, {
            "fault": f"SIGSTOP c1 (daemons' node, queue leader) {PARTITION_SECONDS:.0f}s, SIGCONT",
            "healed_s": round(healed, 1),
            "app_restarted": restarted,
        }

    under_load(scenario, leader=1, daemons_on=1, producer_on=3, fault=cut_node_1)


def test_launchers_publish_through_every_fault(launchers: LaunchPool) -> None:
    """Every launch during the faults published through some node and spooled nothing; with
    no node answering, launches spool, and the spool is delivered once one answers again."""
    cluster = launchers.cluster
    if not launchers.faults:  # run alone: give the launchers a fault of their own
        time.sleep(3)
        cluster.node(1).kill()
        cluster.restart_later(cluster.node(1)).join(120)
        launchers.faults.append("kill c1")
    done = launchers.launchers.finish()
    assert done, "no launch ran"
    (launchers.tmp / "odd-launches.txt").write_text("\n\n".join(_odd(done)))
    assert all(launch_.status == launch_.rc for launch_ in done), _odd(done)
    assert not [launch_ for launch_ in done if launch_.spooled], _odd(done)
    _check_store(launchers, done, "launchers_through_faults", faults=launchers.faults)

    for proxy in launchers.proxies:
        proxy.refuse()
    env = launchers.env(launchers.every_proxy()) | {"EXITPIPE_RETRY_SECONDS": "2"}
    offline = [launch(f"offline-{i}", rc, env) for i, rc in enumerate((101, 9))]
    assert all(o.status == o.rc and o.spooled for o in offline), _odd(offline)
    assert len(list(launchers.spool.glob("*.json"))) == len(offline)
    for proxy in launchers.proxies:
        proxy.passthrough()
    flush = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", "spool", "flush"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert flush.returncode == 0 and f"delivered {len(offline)}, 0 left" in flush.stdout, flush
    _check_store(launchers, offline, "launch_when_no_node_answers")


def _check_store(
    pool: LaunchPool, done: list[Launch], scenario: str, **extra: object
) -> dict[str, Any]:
    """Every launch's exit reached the store once, and its job ended as the pure code says."""
    expected = _expected_status(done)
    jobs = {launch_.job for launch_ in done}

    def arrived() -> bool:
        store = open_store(pool.store_url)
        try:
            return jobs <= {s.job_id for s in store.list()}
        finally:
            store.close()

    with contextlib.suppress(AssertionError):
        wait_for(arrived, 60, "every launched job in the store")
    store = open_store(pool.store_url)
    try:
        views = {job: store.get(job) for job in jobs}
    finally:
        store.close()
    lost = sorted(job for job, view in views.items() if view is None)
    twice = sorted(job for job, v in views.items() if v is not None and len(v.history) != 1)
    wrong = sorted(
        job for job, v in views.items() if v is not None and v.status != expected.get(job)
    )
    seconds = sorted(launch_.seconds for launch_ in done)
    line = {
        "scenario": scenario,
        "launches": len(done),
        "spooled": sum(1 for launch_ in done if launch_.spooled),
        "lost": len(lost),
        "duplicate_effects": len(twice),
        "wrong_final_states": len(wrong),
        "launch_s_p50": seconds[len(seconds) // 2],
        "launch_s_max": seconds[-1],
        **extra,
    }
    record(line)
    assert (lost, twice, wrong) == ([], [], []), (lost, twice, wrong)
    return line


def _expected_status(done: list[Launch]) -> dict[str, Any]:
    """Each launched job's status, from the pure decision code and state machine."""
    model = MemoryStore()
    for launch_ in done:
        event = exit_event(launch_.job, LAUNCH_SITE, map_exit(launch_.rc, False), launch_.rc)
        row = row_event(event)
        if row is not None:
            model.apply_batch([row])  # type: ignore[list-item]
    return {s.job_id: s.status for s in model.list()}


def _odd(done: list[Launch]) -> list[str]:
    """The launches that spooled or lost their worker's status, with their stderr."""
    odd = [d for d in done if d.spooled or d.status != d.rc]
    return [f"{d.job} rc={d.rc} status={d.status} {d.seconds}s: {d.err[-1500:]}" for d in odd]
