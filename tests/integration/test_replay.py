"""Replay, archive export and the dead-letter commands against the real broker, as users run them.

The demo runs once (``exitpipe demo --keep``, as the issue's "Done when" says) and leaves its
namespace and store; the replay tests read that archive and compare with that store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from consumers.store.factory import open_store
from schemas.codes import Code, JobStatus
from schemas.topology import Names
from tests.conftest import delete_namespace
from tests.support.pipeline import (
    count,
    exit_event,
    lifecycle,
    publish_raw,
    running,
    send,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration

RATE = re.compile(r"^(\d+) events in ([\d.]+) s \((\d+) events/s\)$", re.MULTILINE)


def _env(amqp_url: str, namespace: str | None = None, **more: str) -> dict[str, str]:
    env = {**os.environ, "EXITPIPE_AMQP_URL": amqp_url, "EXITPIPE_POLICY": "nvflare-2.8", **more}
    if namespace is not None:
        env["EXITPIPE_NAMESPACE"] = namespace
    return env


def _exitpipe(*args: str, env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess; stdin is no terminal (nothing, or ``input``)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *args], env=env, text=True, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def demo(amqp_url: str) -> Iterator[tuple[str, str]]:
    """``exitpipe demo --keep``: its namespace and store, removed after the module."""
    run = _exitpipe("demo", "--keep", env=_env(amqp_url))
    kept = re.search(r"^kept: EXITPIPE_NAMESPACE=(\S+) EXITPIPE_STORE=(\S+)$", run.stdout, re.M)
    assert kept, run.stdout + run.stderr
    namespace, store = kept.groups()
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        yield namespace, store
    finally:
        delete_namespace(amqp_url, namespace)
        shutil.rmtree(Path(store.removeprefix("sqlite:///")).parent, ignore_errors=True)


def _without_recorded_at(job: dict[str, Any]) -> dict[str, Any]:
    history = [{k: v for k, v in row.items() if k != "recorded_at"} for row in job["history"]]
    return {**job, "history": history}


# -- replay of the demo ------------------------------------------------------------------------


def test_replay_reproduces_exactly_what_the_daemons_stored(
    amqp_url: str, demo: tuple[str, str]
) -> None:
    namespace, store_url = demo
    run = _exitpipe("replay", "--json", env=_env(amqp_url, namespace))
    assert run.returncode == 0, run.stderr
    replayed = {job["job_id"]: job for job in json.loads(run.stdout)["jobs"]}
    store = open_store(store_url)
    try:
        stored = {s.job_id: store.get(s.job_id) for s in store.list()}
    finally:
        store.close()
    assert set(replayed) == set(stored) and len(stored) == 8
    env = {**_env(amqp_url, namespace), "EXITPIPE_STORE": store_url}
    for job_id, view in stored.items():
        assert view is not None
        exits = replayed[job_id].pop("exits")
        assert _without_recorded_at(replayed[job_id]) == _without_recorded_at(view.as_json())
        # jobs show reads the same exits from the archive, ignored ones included.
        shown = json.loads(_exitpipe("jobs", "show", job_id, "--json", env=env).stdout)
        assert shown["exits"] == exits
    assert RATE.search(run.stderr), run.stderr


def test_the_legacy_policy_would_have_failed_exactly_the_teardown_job(
    amqp_url: str, demo: tuple[str, str]
) -> None:
    namespace, _ = demo
    env = _env(amqp_url, namespace)
    text = _exitpipe("replay", "--from", "first", "--compare-policy", "nvflare-2.8-legacy", env=env)
    assert text.returncode == 1, text.stderr
    named = set(re.findall(rf"{re.escape(namespace)}-[\w-]+", text.stdout))
    assert named == {f"{namespace}-teardown"}, text.stdout
    assert "fail-on-exception" in text.stdout
    out = _exitpipe("replay", "--compare-policy", "nvflare-2.8-legacy", "--json", env=env)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["policy"] == {"name": "nvflare-2.8", "version": "1"}
    (difference,) = report["differences"]
    assert difference["job_id"] == f"{namespace}-teardown"
    assert (difference["status"], difference["other_status"]) == (
        "FINISHED:COMPLETED",
        "FINISHED:EXECUTION_EXCEPTION",
    )
    assert (difference["rule"], difference["other_rule"]) == ("default", "fail-on-exception")
    same = _exitpipe("replay", "--compare-policy", "nvflare-2.8", env=env)
    assert same.returncode == 0, same.stdout


def test_export_then_replay_of_the_file_equals_replay_of_the_archive(
    amqp_url: str, demo: tuple[str, str], tmp_path: Path
) -> None:
    env = _env(amqp_url, demo[0])
    events = tmp_path / "events.jsonl"
    with events.open("w") as out:
        export = _exitpipe("archive", "export", env=env, stdout=out, stderr=subprocess.PIPE)
    assert export.returncode == 0, export.stderr
    from_archive = _exitpipe("replay", "--json", env=env)
    from_file = _exitpipe("replay", "--file", str(events), "--json", env=env)
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout) == json.loads(from_archive.stdout)
    piped = _exitpipe("replay", "--file", "-", "--json", env=env, input=events.read_text())
    assert json.loads(piped.stdout) == json.loads(from_archive.stdout)


def test_replay_windows_and_one_job(amqp_url: str, demo: tuple[str, str]) -> None:
    namespace, _ = demo
    env = _env(amqp_url, namespace)
    total = json.loads(_exitpipe("replay", "--json", env=env).stdout)["events"]
    tail = json.loads(_exitpipe("replay", "--from", "last", "--json", env=env).stdout)
    assert 0 < tail["events"] < total
    past = _exitpipe("replay", "--from", str(total), "--json", env=env)
    assert json.loads(past.stdout)["events"] == 0
    assert (
        json.loads(_exitpipe("replay", "--from", "1h", "--json", env=env).stdout)["events"] == total
    )
    gone = _exitpipe("replay", "--until", "2020-01-01T00:00:00Z", "--json", env=env)
    assert json.loads(gone.stdout)["events"] == 0
    job = f"{namespace}-teardown"
    one = _exitpipe("replay", "--job", job, env=env)
    assert one.returncode == 0
    assert "not_reported" in one.stdout and "final status: FINISHED:COMPLETED" in one.stdout
    assert set(re.findall(rf"{re.escape(namespace)}-[\w-]+", one.stdout)) == {job}
    nothing = _exitpipe("replay", "--job", "no-such-job", env=env)
    assert nothing.returncode == 0, "1 means only that policies differ"
    assert "no event of job 'no-such-job' was read" in nothing.stderr
    missing = _exitpipe("replay", "--namespace", f"none-{uuid.uuid4().hex[:6]}", env=env)
    assert missing.returncode == 2 and "no archive stream" in missing.stderr


# -- republish ---------------------------------------------------------------------------------


def test_republish_is_safe_duplicates_only(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = settings_for(amqp_url, namespace, store_url)
    job = f"{namespace}-fails"
    events = [
        lifecycle(job, JobStatus.RUNNING, ["site-1"]),
        exit_event(job, "site-1", Code.CONFIG_ERROR, 103),
    ]
    env = _env(amqp_url, namespace)
    with running(settings):
        send(amqp_url, namespace, events)
        wait_until(lambda: _rows(store_url, job) == [0, 0])
        refused = _exitpipe("replay", "--republish", env=env)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        again = _exitpipe("replay", "--republish", "--yes", "--job", job, env=env)
        assert again.returncode == 0, again.stderr
        assert "republished 2 of 2 events" in again.stderr
        wait_until(lambda: _rows(store_url, job) == [1, 1])
    store = open_store(store_url)
    try:
        view = store.get(job)
        assert view is not None and view.status is JobStatus.FINISHED_EXECUTION_EXCEPTION
    finally:
        store.close()


def _rows(store_url: str, job: str) -> list[int] | None:
    """The duplicates count of each history row of ``job``."""
    store = open_store(store_url)
    try:
        view = store.get(job)
        return [row.duplicates for row in view.history] if view else None
    finally:
        store.close()


# -- files -------------------------------------------------------------------------------------


def _write_events(path: Path, count: int) -> None:
    """``count`` events, ten per job: four lifecycle events and six exits of several codes."""
    codes = [("SUCCESS", 0), ("EXECUTION_ERROR", 1), ("SUCCESS", 0), ("EXCEPTION", 101)]
    with path.open("w") as out:
        for n in range(count // 10):
            job = f"job-{n}"
            for status in ("SUBMITTED", "RUNNING"):
                out.write(_line("lifecycle", job_id=job, status=status, sites=["s-1", "s-2"]))
            for k in range(6):
                code, rc = codes[(n + k) % len(codes)]
                out.write(
                    _line("exit", job_id=job, site=f"s-{k % 2 + 1}", code=code, return_code=rc)
                )
            for status in ("DISPATCHED", "FINISHED:COMPLETED"):
                out.write(_line("lifecycle", job_id=job, status=status))


def _line(kind: str, **fields: Any) -> str:
    body = {"schema": f"exitpipe.{kind}/1", "event_id": str(uuid.uuid4()), **fields}
    body["occurred_at"] = "2026-01-31T12:00:00Z"
    return json.dumps(body, separators=(",", ":")) + "\n"


def test_a_100000_event_file_is_replayed_and_its_rate_reported(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write_events(path, 100_000)
    out = tmp_path / "replay.json"
    with out.open("w") as stdout:
        run = _exitpipe(
            "replay",
            "--file",
            str(path),
            "--json",
            env=_env("amqp://unused/"),
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
    assert run.returncode == 0, run.stderr
    rate = RATE.search(run.stderr)
    assert rate is not None, run.stderr
    assert int(rate.group(1)) == 100_000 and int(rate.group(3)) > 0
    report = json.loads(out.read_text())
    assert report["events"] == 100_000 and len(report["jobs"]) == 10_000


def test_bad_lines_are_reported_by_number_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = [
        _line("lifecycle", job_id="j", status="RUNNING", sites=["s-1"]),
        _line("exit", job_id="j", site="s-1", code="ABORTED", return_code=9),
    ]
    path.write_text(
        good[0]
        + "this is not json\n"
        + '{"schema":"exitpipe.exit/1"}\n'
        + good[1]
        + _line("lifecycle", job_id="j", status="DONE")
    )
    run = _exitpipe("replay", "--file", str(path), "--json", env=_env("amqp://unused/"))
    assert run.returncode == 0, run.stderr
    assert re.search(r"line 2: body: not JSON .*\(skipped\)", run.stderr), run.stderr
    assert re.search(r"line 3: .*event_id: missing", run.stderr), run.stderr
    assert re.search(r"line 5: status: ", run.stderr), run.stderr
    assert "line 1:" not in run.stderr and "line 4:" not in run.stderr
    report = json.loads(run.stdout)
    assert report["events"] == 2
    assert [j["status"] for j in report["jobs"]] == ["FINISHED:ABORTED"]
    missing = _exitpipe("replay", "--file", str(tmp_path / "nope"), env=_env("amqp://unused/"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# -- dead letters ------------------------------------------------------------------------------


def _crash_until_dead(amqp_url: str, queue: str, dead_letters: str, expected: int) -> None:
    """Act as a consumer that crashes on every delivery, until the broker gives up on them."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()

    def crash_once() -> bool:
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            channel.basic_nack(method.delivery_tag, requeue=True)
        return count(amqp_url, dead_letters) >= expected

    try:
        wait_until(crash_once, timeout=30)
    finally:
        conn.close()


def test_dead_letters_are_listed_requeued_when_fixed_and_purged(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = settings_for(amqp_url, namespace, store_url, delivery_limit=1)
    names = Names(namespace)
    env = _env(amqp_url, namespace)
    job = f"{namespace}-stuck"
    running_event = lifecycle(job, JobStatus.RUNNING, ["site-1"])
    # The job-state consumer is down (a bug crashes it on every delivery): its input is
    # dead-lettered by the broker's delivery limit, with x-death.
    with running(settings, job_state=False):
        send(amqp_url, namespace, [running_event, exit_event(job, "site-1", Code.EXCEPTION, 101)])
        wait_until(lambda: count(amqp_url, names.job_state) == 2)
    _crash_until_dead(amqp_url, names.job_state, names.dead_letters, 2)

    listed = _exitpipe("dead", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert {(d["reason"], d["source"], d["count"]) for d in letters} == {
        ("delivery_limit", names.job_state, 1)
    }
    assert {d["routing_key"] for d in letters} == {"lifecycle.RUNNING", "transition.fail"}
    assert count(amqp_url, names.dead_letters) == 2  # listing took nothing away
    text = _exitpipe("dead", "list", env=env)
    assert "delivery_limit" in text.stdout and names.job_state in text.stdout

    with running(settings):  # the bug is fixed: the job-state consumer is back
        bad = b'{"schema":"exitpipe.lifecycle/1","job_id":"x","status":"NOPE"}'
        publish_raw(amqp_url, names.jobs, "lifecycle.NOPE", bad, message_id="bad-1")
        wait_until(lambda: count(amqp_url, names.dead_letters) == 3)
        rejected = next(
            d
            for d in json.loads(_exitpipe("dead", "list", "--json", env=env).stdout)
            if d["message_id"] == "bad-1"
        )
        assert rejected["source"] == names.job_state and rejected["count"] == 0
        assert "status" in rejected["reason"]

        one = _exitpipe("dead", "requeue", "--id", str(running_event.event_id), env=env)
        assert one.returncode == 0, one.stderr
        assert f"requeued to {names.jobs} with key lifecycle.RUNNING" in one.stdout
        wait_until(lambda: _status(store_url, job) is JobStatus.RUNNING)
        unknown = _exitpipe("dead", "requeue", "--id", "no-such-id", env=env)
        assert unknown.returncode == 1 and "no dead letter" in unknown.stderr

        rest = _exitpipe("dead", "requeue", "--all", env=env)
        assert rest.returncode == 0, rest.stderr
        wait_until(lambda: _status(store_url, job) is JobStatus.FINISHED_EXECUTION_EXCEPTION)
        # the bad body is still bad: the consumer dead-letters it again, with its reason
        wait_until(lambda: count(amqp_url, names.dead_letters) == 1)

    refused = _exitpipe("dead", "purge", env=env)
    assert refused.returncode == 2 and count(amqp_url, names.dead_letters) == 1
    purged = _exitpipe("dead", "purge", "--yes", env=env)
    assert purged.returncode == 0 and "purged 1" in purged.stdout
    assert count(amqp_url, names.dead_letters) == 0


def _status(store_url: str, job: str) -> JobStatus | None:
    store = open_store(store_url)
    try:
        view = store.get(job)
        return view.status if view else None
    finally:
        store.close()
