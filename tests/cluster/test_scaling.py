"""Several consumers of each kind on the cluster and one PostgreSQL store: 1, 2 and 3
classifiers with as many job-state consumers, fed the same stream, in which several sites
report on the same jobs at the same time. Every run must end with the final states and
histories of the single-instance run, and each run's events per second are recorded.

The stream comes in four phases, each published only once the store holds the one before:
every job SUBMITTED; RUNNING with its three sites; every site's exit reports at once, one
publisher per site, a tenth of them twice; FINISHED:COMPLETED for the jobs still running.
RabbitMQ hands consecutive messages to different consumers, so several consumers may apply a
job's events in another order than they were published: two lifecycle events of one job
published back to back (SUBMITTED, RUNNING) can land RUNNING first, and SUBMITTED is then
recorded ``ignored_backward`` (README, Scaling out). Hence the phases. Within the exit phase
the order is left to the consumers, and the stream gives each job at most one terminal
verdict: whatever the order, the same rows, except which of several equal reports of a job
was the one applied (the others are ``ignored_terminal``). Each job's rows are compared as a
set of reports and a multiset of effects.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from consumers.policy import decide
from consumers.store.factory import open_store
from producers.broker import declare_topology
from producers.publisher import Outcome, Publisher, outgoing
from schemas.codes import Action, Code, JobStatus
from schemas.events import Event
from schemas.topology import Names, topology
from tests.cluster.harness import SIZE, Cluster, record
from tests.conftest import delete_namespace, pg_schema
from tests.faults.harness import (
    POLICY,
    Daemon,
    daemon_env,
    daemons,
    exit_event,
    free_port,
    lifecycle,
    publish_outcomes,
    wait_for,
)

pytestmark = pytest.mark.cluster
JOBS = 1500
SITES = [f"site-{i}" for i in range(6)]
FOREIGN = "site-x"  # reports on jobs it is not part of
INSTANCES = (1, 2, 3)


# -- the stream ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """Events published together (``by`` each sender, in parallel), and what they add."""

    name: str
    by: dict[str, list[Event]]
    rows: int
    duplicates: int

    @property
    def events(self) -> int:
        return sum(len(events) for events in self.by.values())


def _reports(i: int, sites: list[str]) -> list[tuple[str, Code, int]]:
    """The exit reports of job ``i``: all fail, all stop, one fails, all succeed, or a
    foreign site fails while its own succeed."""
    kind = i % 5
    if kind == 0:
        return [(s, Code.EXCEPTION, 101) for s in sites]
    if kind == 1:
        return [(s, Code.ABORTED, 9) for s in sites]
    if kind == 2:
        return [(sites[0], Code.EXCEPTION, 101)] + [(s, Code.SUCCESS, 0) for s in sites[1:]]
    if kind == 3:
        return [(s, Code.SUCCESS, 0) for s in sites]
    return [(s, Code.SUCCESS, 0) for s in sites] + [(FOREIGN, Code.EXCEPTION, 101)]


def stream(jobs: int) -> list[Phase]:
    """The four phases of the stream for ``jobs`` jobs, three sites each."""
    submitted: list[Event] = []
    running: list[Event] = []
    exits: dict[str, list[Event]] = {}
    rows = duplicates = 0
    finals: list[Event] = []
    for i in range(jobs):
        job = f"job-{i}"
        sites = [SITES[(i + k) % len(SITES)] for k in range(3)]
        submitted.append(lifecycle(job, JobStatus.SUBMITTED))
        running.append(lifecycle(job, JobStatus.RUNNING, sites))
        for n, (site, code, rc) in enumerate(_reports(i, sites)):
            event = exit_event(job, site, code, rc)
            twice = (i + n) % 10 == 0
            exits.setdefault(site, []).extend([event, event] if twice else [event])
            if decide(event, POLICY).action is not Action.IGNORE:
                rows, duplicates = rows + 1, duplicates + twice
        if i % 5 in (3, 4):
            finals.append(lifecycle(job, JobStatus.FINISHED_COMPLETED))
    return [
        Phase("submitted", {"server": submitted}, jobs, 0),
        Phase("running", {"server": running}, jobs, 0),
        Phase("exits", exits, rows, duplicates),
        Phase("finished", {"server": finals}, len(finals), 0),
    ]


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    instances: int
    histories: dict[str, Any]
    seconds: list[float]
    events: int

    @property
    def per_second(self) -> float:
        return round(self.events / sum(self.seconds), 1)


def run(cluster: Cluster, pg_url: str, phases: Sequence[Phase], instances: int, tmp: Any) -> Run:
    """The stream through ``instances`` classifiers and job-state consumers, each pair on a
    different first node; the time each phase took, and the store's histories."""
    ns = f"s-{uuid.uuid4().hex[:10]}"
    declare_topology(cluster.urls(), topology(ns, quorum_size=SIZE), retry_seconds=60)
    with pg_schema(pg_url, prefix="c_") as store_url:
        ports = [free_port() for _ in range(2 * instances)]
        procs = [
            Daemon(
                command,
                daemon_env(
                    cluster.urls(*_order(i + k)),
                    ns,
                    store_url,
                    EXITPIPE_METRICS_PORT=str(ports[2 * i + k]),
                ),
                tmp / f"{ns}-{command}-{i}.log",
            )
            for i in range(instances)
            for k, command in enumerate(("classifier", "job-state"))
        ]
        try:
            with daemons(*procs):
                wait_for(lambda: all(_healthy(p) for p in ports), 90, "every daemon consuming")
                seconds = [_phase(cluster, ns, store_url, phases, i) for i in range(len(phases))]
            histories = _histories(store_url)
        finally:
            with contextlib.suppress(Exception):
                delete_namespace(cluster.urls(), ns)
    events = sum(p.events for p in phases)
    return Run(instances, histories, seconds, events)


def _order(first: int) -> tuple[int, ...]:
    return tuple((first + i) % SIZE + 1 for i in range(SIZE))


def _healthy(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/healthz"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
        return bool(answer.status == 200)
    return False


def _phase(cluster: Cluster, ns: str, store_url: str, phases: Sequence[Phase], n: int) -> float:
    """Publish phase ``n`` (each sender on its own thread and node); seconds until the store
    holds it."""
    phase = phases[n]
    rows = sum(p.rows for p in phases[: n + 1])
    duplicates = sum(p.duplicates for p in phases[: n + 1])
    names = Names(ns)
    failures: list[str] = []

    def send(number: int, events: list[Event]) -> None:
        urls = cluster.urls(*_order(number))
        with Publisher(urls, retry_seconds=60) as publisher:
            for start in range(0, len(events), 200):
                part = events[start : start + 200]
                outcomes = publish_outcomes(publisher, [outgoing(names, e) for e in part])
                failures.extend(o.value for o in outcomes if o is not Outcome.CONFIRMED)

    started = time.monotonic()
    threads = [
        threading.Thread(target=send, args=(number, events))
        for number, events in enumerate(phase.by.values())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures, failures[:5]
    _until_stored(store_url, (rows, duplicates), phase.name)
    return time.monotonic() - started


def _until_stored(store_url: str, totals: tuple[int, int], phase: str) -> None:
    """Poll the store's (rows, duplicates) every 20 ms until they are ``totals``."""
    deadline = time.monotonic() + 300
    with psycopg.connect(store_url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*), coalesce(sum(duplicates), 0) FROM history")
            got = row.fetchone()
            if got is not None and (int(got[0]), int(got[1])) == totals:
                return
            assert time.monotonic() < deadline, f"phase {phase}: {got} of {totals} after 300s"
            time.sleep(0.02)


def _histories(store_url: str) -> dict[str, Any]:
    """Each job's status, sites, reports (set) and effects (multiset)."""
    store = open_store(store_url)
    try:
        views = [store.get(s.job_id) for s in store.list()]
    finally:
        store.close()
    out = {}
    for view in views:
        assert view is not None
        reports = sorted(
            (r.event_id, r.kind, r.site or "", r.code or "", r.action, r.duplicates)
            for r in view.history
        )
        effects = Counter(
            (r.outcome.value, str(r.status_before), str(r.status_after)) for r in view.history
        )
        out[view.job_id] = (str(view.status), view.sites, reports, sorted(effects.items()))
    return out


# -- the test ------------------------------------------------------------------------------------


def test_several_consumers_of_each_kind_match_a_single_instance(
    cluster: Cluster, pg_url: str, tmp_path: Any
) -> None:
    phases = stream(JOBS)
    runs = [run(cluster, pg_url, phases, n, tmp_path) for n in INSTANCES]
    single = runs[0]
    assert len(single.histories) == JOBS
    for other in runs[1:]:
        differ = [j for j in single.histories if single.histories[j] != other.histories.get(j)]
        if differ:
            for r in (single, other):
                dump = tmp_path / f"histories-{r.instances}.json"
                dump.write_text(json.dumps({j: r.histories.get(j) for j in differ}, indent=1))
        assert not differ, f"{len(differ)} jobs differ with {other.instances}: see {tmp_path}"
    for r in runs:
        record(
            {
                "scenario": f"throughput[{r.instances} classifier(s) + {r.instances} job-state]",
                "instances": r.instances,
                "events": r.events,
                "seconds": round(sum(r.seconds), 2),
                "events_per_s": r.per_second,
                "phases_s": [round(s, 2) for s in r.seconds],
                "same_as_single": True,
            }
        )
