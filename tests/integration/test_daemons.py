"""The classifier and job-state daemons against the real broker and both stores."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest

from consumers.policy import load_policy
from consumers.store.factory import open_store
from exitpipe.demo import Story, expected_rows, scenario
from schemas.codes import Code, JobStatus
from schemas.topology import ERROR_HEADER, SOURCE_HEADER, Names
from tests.support.pipeline import (
    count,
    drain,
    exit_event,
    lifecycle,
    publish_raw,
    running,
    send,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("pg_store_url"))


def _rows_reached(store_url: str, stories: list[Story], rows: Callable[[Story], int]) -> bool:
    store = open_store(store_url)
    try:
        for story in stories:
            job = store.get(story.job_id)
            if job is None or len(job.history) < rows(story):
                return False
        return True
    finally:
        store.close()


def test_every_demo_story_ends_as_expected(amqp_url: str, namespace: str, store_url: str) -> None:
    settings = settings_for(amqp_url, namespace, store_url)
    policy = load_policy(settings.policy)
    stories = scenario(namespace)
    with running(settings):
        send(amqp_url, namespace, [e for s in stories for e in s.events])
        first = lambda s: expected_rows(Story(s.job_id, "", s.expected, s.events), policy)  # noqa: E731
        wait_until(lambda: _rows_reached(store_url, stories, first))
        send(amqp_url, namespace, [e for s in stories for e in s.late])
        wait_until(lambda: _rows_reached(store_url, stories, lambda s: expected_rows(s, policy)))
        store = open_store(store_url)
        try:
            dup = next(s for s in stories if s.job_id.endswith("-duplicate"))
            wait_until(lambda: sum(r.duplicates for r in store.get(dup.job_id).history) == 1)  # type: ignore[union-attr]
            for story in stories:
                job = store.get(story.job_id)
                assert job is not None
                assert job.status == story.expected, (story.title, job.as_json())
            foreign = store.get(next(s.job_id for s in stories if s.job_id.endswith("-foreign")))
            assert [r.outcome.value for r in foreign.history if r.kind == "transition"] == [  # type: ignore[union-attr]
                "ignored_foreign_site"
            ]
            late = store.get(
                next(s.job_id for s in stories if s.job_id.endswith("fail-then-abort"))
            )
            assert late.history[-1].outcome.value == "ignored_terminal"  # type: ignore[union-attr]
            assert late.history[-1].code == "ABORTED"  # type: ignore[union-attr]
        finally:
            store.close()


def test_bad_input_is_dead_lettered_with_reason_and_the_daemons_keep_going(
    amqp_url: str, namespace: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    names = Names(namespace)
    with running(settings_for(amqp_url, namespace, store_url)):
        publish_raw(amqp_url, names.events, "exit.site-1", b"{not json", message_id="bad-1")
        publish_raw(
            amqp_url,
            names.events,
            "exit.site-1",
            json.dumps({"schema": "exitpipe.exit/9", "event_id": "x"}).encode(),
            message_id="bad-2",
        )
        publish_raw(amqp_url, names.jobs, "lifecycle.RUNNING", b"\xff\xfe", message_id="bad-3")
        good = [
            lifecycle("j-good", JobStatus.RUNNING),
            exit_event("j-good", "site-1", Code.EXCEPTION),
        ]
        send(amqp_url, namespace, good)

        def applied() -> bool:
            store = open_store(store_url)
            try:
                job = store.get("j-good")
                return job is not None and job.status is JobStatus.FINISHED_EXECUTION_EXCEPTION
            finally:
                store.close()

        wait_until(applied)
        wait_until(lambda: count(amqp_url, names.dead_letters) == 3)
    dead = {p.message_id: p.headers for p, _ in drain(amqp_url, names.dead_letters)}
    assert dead["bad-1"][ERROR_HEADER].startswith("body: not JSON")
    assert dead["bad-1"][SOURCE_HEADER] == names.classify
    assert (
        "schema" in dead["bad-2"][ERROR_HEADER] and "exitpipe.exit/9" in dead["bad-2"][ERROR_HEADER]
    )
    assert dead["bad-3"][ERROR_HEADER].startswith("body: not UTF-8")
    assert dead["bad-3"][SOURCE_HEADER] == names.job_state


def test_schema_invalid_event_names_the_field(amqp_url: str, namespace: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    names = Names(namespace)
    with running(settings_for(amqp_url, namespace, f"sqlite:///{tmp_path / 'j.db'}")):
        body = json.dumps(
            {
                "schema": "exitpipe.exit/1",
                "event_id": "6f1c0a38-52d3-4c3e-9d0a-3f8e2d1b7a55",
                "job_id": "bad job!",
                "site": "site-1",
                "code": "EXCEPTION",
                "occurred_at": "2026-01-01T00:00:00Z",
            }
        ).encode()
        publish_raw(amqp_url, names.events, "exit.site-1", body, message_id="bad-job")
        wait_until(lambda: count(amqp_url, names.dead_letters) == 1)
    ((props, got),) = drain(amqp_url, names.dead_letters)
    assert got == body, "the original body is kept"
    assert props.headers[ERROR_HEADER].startswith("job_id: must be 1 to 128 characters")


def test_several_job_state_consumers_on_postgres_converge(
    amqp_url: str, namespace: str, pg_store_url: str
) -> None:
    settings = settings_for(amqp_url, namespace, pg_store_url, prefetch=20, batch_size=7)
    jobs = [f"pg-{i}" for i in range(40)]
    events = []
    expected = {}
    for i, job in enumerate(jobs):
        events += [
            lifecycle(job, JobStatus.SUBMITTED, ["site-1", "site-2"]),
            lifecycle(job, JobStatus.RUNNING),
        ]
        if i % 3 == 0:
            events.append(exit_event(job, "site-1", Code.EXCEPTION))
            expected[job] = JobStatus.FINISHED_EXECUTION_EXCEPTION
        elif i % 3 == 1:
            events.append(lifecycle(job, JobStatus.FINISHED_COMPLETED))
            expected[job] = JobStatus.FINISHED_COMPLETED
        else:
            expected[job] = JobStatus.RUNNING
        events.append(lifecycle(job, JobStatus.DISPATCHED))  # late and backward: ignored
    events += events[::5]  # redeliveries
    with running(settings), running(settings, classifier=False):
        send(amqp_url, namespace, events)

        def done() -> bool:
            store = open_store(pg_store_url)
            try:
                return all(
                    (j := store.get(job)) is not None
                    and j.status == status
                    and len(j.history) == (4 if status is not JobStatus.RUNNING else 3)
                    for job, status in expected.items()
                )
            finally:
                store.close()

        wait_until(done, timeout=30)


def test_health_and_metrics_endpoints(amqp_url: str, namespace: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_for(
        amqp_url, namespace, f"sqlite:///{tmp_path / 'j.db'}", metrics_port=port
    )
    with running(settings):
        send(amqp_url, namespace, [exit_event("m-1", "site-1", Code.ABORTED)])
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/healthz").status == 200

        def counted() -> bool:
            text = urllib.request.urlopen(f"{base}/metrics").read().decode()
            return (
                'exitpipe_events_total{daemon="job-state",decision="stop",outcome="applied"}'
                in text
            )

        wait_until(counted)
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert "exitpipe_processing_seconds_bucket" in text
        assert 'exitpipe_events_total{daemon="classifier",decision="stop",outcome=""}' in text


def test_health_fails_while_the_broker_is_away_and_recovers(
    amqp_url: str, namespace: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import socket
    import urllib.error
    from urllib.parse import urlsplit

    from tests.support.proxy import Proxy

    def health(port: int) -> int:
        try:
            return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parts = urlsplit(amqp_url)
    with Proxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        settings = settings_for(
            proxy.url(amqp_url), namespace, f"sqlite:///{tmp_path / 'j.db'}", metrics_port=port
        )
        with running(settings):
            assert health(port) == 200
            proxy.refuse()
            proxy.reset()
            wait_until(lambda: health(port) == 503)
            proxy.passthrough()
            wait_until(lambda: health(port) == 200, timeout=30)
            send(amqp_url, namespace, [exit_event("h-1", "site-1", Code.EXCEPTION, 101)])

            def applied() -> bool:
                store = open_store(f"sqlite:///{tmp_path / 'j.db'}")
                try:
                    job = store.get("h-1")
                    return job is not None and job.status is JobStatus.FINISHED_EXECUTION_EXCEPTION
                finally:
                    store.close()

            wait_until(applied)
