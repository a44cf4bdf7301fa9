"""``exitpipe demo``: the whole pipeline on the local broker, with the stories of DESIGN 1.

A fresh namespace and a temporary SQLite store; both daemons in this process; events sent
through the real producer code; the job table printed with the reason for each final status.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from consumers.explain import why
from consumers.policy import Policy, decide, load_policy
from consumers.store import JobView, Store
from consumers.store.factory import open_store
from exitpipe.commands.producers import publisher_for
from exitpipe.commands.table import render
from exitpipe.runtime import Pipeline
from exitpipe.settings import Settings, redact, topology_of
from producers.broker import declare_topology, delete_topology
from producers.errors import BrokerError
from producers.publisher import publish_events
from schemas.codes import Action, Code, JobStatus, Launcher
from schemas.events import ExitEvent, LifecycleEvent
from schemas.topology import Names

Event = ExitEvent | LifecycleEvent
SITES = ["site-1", "site-2", "site-3"]


@dataclass
class Story:
    """One job: what happens to it, and how it must end."""

    job_id: str
    title: str
    expected: JobStatus
    events: list[Event] = field(default_factory=list)
    late: list[Event] = field(default_factory=list)  # sent after the first wave is applied


def _now() -> datetime:
    return datetime.now(UTC)


def _exit(job: str, site: str, code: Code, rc: int, launcher: Launcher, reason: str) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=rc,
        launcher=launcher,
        reason=reason,
        occurred_at=_now(),
    )


def _life(job: str, status: JobStatus, sites: list[str] | None = None) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=uuid.uuid4(), job_id=job, status=status, sites=sites, occurred_at=_now()
    )


def _started(job: str, sites: list[str] = SITES) -> list[Event]:
    return [
        _life(job, JobStatus.SUBMITTED, sites),
        _life(job, JobStatus.DISPATCHED),
        _life(job, JobStatus.RUNNING),
    ]


def scenario(prefix: str) -> list[Story]:
    """The demo's jobs; ``prefix`` keeps ids unique across runs on one broker."""
    j = {
        name: f"{prefix}-{name}"
        for name in (
            "teardown",
            "k8s-pending",
            "config",
            "unsafe",
            "aborted",
            "fail-then-abort",
            "foreign",
            "duplicate",
        )
    }
    P, D, K = Launcher.PROCESS, Launcher.DOCKER, Launcher.K8S
    dup = _exit(j["duplicate"], "site-2", Code.EXCEPTION, 101, P, "worker raised ValueError")
    return [
        Story(
            j["teardown"],
            "finished, then EXECUTION_ERROR while tearing down",
            JobStatus.FINISHED_COMPLETED,
            [
                *_started(j["teardown"]),
                _exit(j["teardown"], "site-2", Code.EXECUTION_ERROR, 1, P, "exit 1 in teardown"),
                _life(j["teardown"], JobStatus.FINISHED_COMPLETED),
            ],
        ),
        Story(
            j["k8s-pending"],
            "K8s pod Pending past its timeout",
            JobStatus.FINISHED_EXECUTION_EXCEPTION,
            [
                _life(j["k8s-pending"], JobStatus.SUBMITTED, SITES),
                _life(j["k8s-pending"], JobStatus.DISPATCHED),
                _exit(
                    j["k8s-pending"],
                    "site-3",
                    Code.EXCEPTION,
                    101,
                    K,
                    "pod stayed Pending past pending_timeout",
                ),
            ],
        ),
        Story(
            j["config"],
            "a site cannot load the job's configuration",
            JobStatus.FINISHED_EXECUTION_EXCEPTION,
            [
                *_started(j["config"]),
                _exit(j["config"], "site-1", Code.CONFIG_ERROR, 103, D, "config_fed_client.json"),
            ],
        ),
        Story(
            j["unsafe"],
            "a site refuses an unsafe component",
            JobStatus.FINISHED_ABORTED,
            [
                *_started(j["unsafe"]),
                _exit(j["unsafe"], "site-2", Code.UNSAFE_COMPONENT, 102, P, "component refused"),
            ],
        ),
        Story(
            j["aborted"],
            "a container is killed",
            JobStatus.FINISHED_ABORTED,
            [
                *_started(j["aborted"]),
                _exit(j["aborted"], "site-3", Code.ABORTED, 9, D, "container killed"),
            ],
        ),
        Story(
            j["fail-then-abort"],
            "fails on one site, then another site reports ABORTED",
            JobStatus.FINISHED_EXECUTION_EXCEPTION,
            [
                *_started(j["fail-then-abort"]),
                _exit(j["fail-then-abort"], "site-1", Code.EXCEPTION, 101, P, "CUDA error"),
            ],
            late=[
                _exit(
                    j["fail-then-abort"],
                    "site-2",
                    Code.ABORTED,
                    9,
                    P,
                    "aborted while the job was being failed",
                )
            ],
        ),
        Story(
            j["foreign"],
            "a site outside the job reports an exception",
            JobStatus.FINISHED_COMPLETED,
            [
                *_started(j["foreign"], ["site-1", "site-2"]),
                _exit(j["foreign"], "site-3", Code.EXCEPTION, 101, P, "not this job's site"),
            ],
            late=[_life(j["foreign"], JobStatus.FINISHED_COMPLETED)],
        ),
        Story(
            j["duplicate"],
            "one exit event delivered twice",
            JobStatus.FINISHED_EXECUTION_EXCEPTION,
            [*_started(j["duplicate"]), dup],
            late=[dup],
        ),
    ]


def expected_rows(story: Story, policy: Policy) -> int:
    """History rows the store should hold: lifecycle events plus reportable exits, once each."""
    seen: set[uuid.UUID] = set()
    rows = 0
    for event in [*story.events, *story.late]:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        if isinstance(event, LifecycleEvent) or decide(event, policy).action is not Action.IGNORE:
            rows += 1
    return rows


def _settled(store: Store, stories: Sequence[Story], rows: Callable[[Story], int]) -> bool:
    for story in stories:
        job = store.get(story.job_id)
        if job is None or len(job.history) < rows(story):
            return False
    return True


def _wait(
    store: Store, stories: Sequence[Story], rows: Callable[[Story], int], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not _settled(store, stories, rows):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every event was applied within {timeout:.0f}s ({what})")
        time.sleep(0.05)


def _notes(story: Story, job: JobView, policy: Policy) -> str:
    notes = []
    ignored = [
        e
        for e in story.events
        if isinstance(e, ExitEvent) and decide(e, policy).action is Action.IGNORE
    ]
    notes += [
        f"{e.site} {e.effective_code.name} ignored by classifier ({decide(e, policy).policy.rule})"
        for e in ignored
    ]
    for row in job.history:
        if row.outcome.value != "applied":
            notes.append(f"{row.site or 'server'} {row.code or row.action}: {row.outcome.value}")
        if row.duplicates:
            notes.append(f"event {row.event_id[:8]} seen {row.duplicates + 1}x, applied once")
    return "; ".join(notes)


def report(stories: Sequence[Story], store: Store, policy: Policy) -> tuple[str, bool]:
    """The job table and whether every job ended as expected."""
    rows, ok = [], True
    for story in stories:
        job = store.get(story.job_id)
        assert job is not None
        good = job.status == story.expected
        ok &= good
        rows.append(
            [
                story.job_id,
                story.title,
                job.status.value if job.status else "-",
                "ok" if good else f"EXPECTED {story.expected.value}",
                why(job),
                _notes(story, job, policy),
            ]
        )
    return render(["job", "story", "final status", "check", "why", "also"], rows), ok


def run_demo(settings: Settings, keep: bool = False, timeout: float = 25.0) -> int:
    """Run the demo; 0 when every job ended as expected."""
    t0 = time.monotonic()
    tag = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="exitpipe-demo-"))
    settings = settings.model_copy(
        update={
            "namespace": f"demo-{tag}",
            "store": f"sqlite:///{workdir / 'demo.db'}",
            "spool_dir": workdir / "spool",
            "retry_seconds": min(settings.retry_seconds, 5.0),
        }
    )
    names = Names(settings.namespace)
    policy = load_policy(settings.policy)

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {msg}", flush=True)

    say(
        f"broker {redact(settings.amqp_url)}, namespace {settings.namespace}, "
        f"store {settings.store}, policy {policy.name}@{policy.version}"
    )
    try:
        declare_topology(
            settings.amqp_url,
            topology_of(settings),
            retry_seconds=settings.retry_seconds,
            ca_file=settings.amqp_ca_file,
        )
    except BrokerError as exc:
        print(
            f"exitpipe demo: no broker answers at {redact(settings.amqp_url)} ({exc}).\n"
            "Start one, for example:\n"
            "  rabbitmq-server -detached            # Debian's rabbitmq-server package\n"
            "  docker run -d -p 5672:5672 rabbitmq:3.10-management\n"
            "or point EXITPIPE_AMQP_URL at yours.",
            file=sys.stderr,
        )
        shutil.rmtree(workdir, ignore_errors=True)
        return 69
    stories = scenario(f"demo-{tag}")
    pipeline = Pipeline(settings, policy=policy, store=open_store(settings.store))
    store = open_store(settings.store)
    try:
        pipeline.start()
        say("classifier and job-state daemons started")
        with publisher_for(settings) as publisher:
            first = [e for s in stories for e in s.events]
            publish_events(publisher, names, first)
            say(f"published {len(first)} events for {len(stories)} jobs; waiting for the store")
            _wait(
                store,
                stories,
                lambda s: expected_rows(Story(s.job_id, "", s.expected, s.events), policy),
                timeout,
                "first wave",
            )
            late = [e for s in stories for e in s.late]
            publish_events(publisher, names, late)
            say(f"published {len(late)} late events (a report after failure, a redelivery)")
        _wait(store, stories, lambda s: expected_rows(s, policy), timeout, "late events")
        _wait_duplicates(store, stories, timeout)
        say("every event applied")
        table, ok = report(stories, store, policy)
        print(table)
        say("every job ended as expected" if ok else "SOME JOBS DID NOT END AS EXPECTED")
        return 0 if ok else 1
    except TimeoutError as exc:
        print(f"exitpipe demo: {exc}", file=sys.stderr)
        return 1
    finally:
        pipeline.stop()
        pipeline.wait()
        store.close()
        if keep:
            print(f"kept: EXITPIPE_NAMESPACE={settings.namespace} EXITPIPE_STORE={settings.store}")
        else:
            delete_topology(settings.amqp_url, topology_of(settings), ca_file=settings.amqp_ca_file)
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_duplicates(store: Store, stories: Sequence[Story], timeout: float) -> None:
    """Wait until every redelivered event shows up as a duplicate count."""
    deadline = time.monotonic() + timeout
    for story in stories:
        first_ids = {e.event_id for e in story.events}
        repeats = sum(1 for e in story.late if e.event_id in first_ids)
        while True:
            job = store.get(story.job_id)
            if job is not None and sum(r.duplicates for r in job.history) >= repeats:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplicates of {story.job_id} not seen within {timeout:.0f}s")
            time.sleep(0.05)
