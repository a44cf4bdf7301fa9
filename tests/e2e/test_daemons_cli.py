"""The daemons and the jobs commands as a user runs them: subprocesses and exit statuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.store.factory import open_store
from schemas.codes import Code, JobStatus
from tests.support.pipeline import exit_event, lifecycle, send, wait_until

pytestmark = pytest.mark.e2e


def _env(amqp_url: str, namespace: str, store: str) -> dict[str, str]:
    return {
        **os.environ,
        "EXITPIPE_AMQP_URL": amqp_url,
        "EXITPIPE_NAMESPACE": namespace,
        "EXITPIPE_STORE": store,
        "EXITPIPE_HEARTBEAT": "5",
    }


def _exitpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exitpipe.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def _applied_rows(store_url: str) -> int:
    store = open_store(store_url)
    try:
        return sum(len(store.get(j.job_id).history) for j in store.list())  # type: ignore[union-attr]
    finally:
        store.close()


def test_sigterm_mid_stream_loses_nothing_and_applies_nothing_twice(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = _env(amqp_url, namespace, store_url)
    assert _exitpipe("topology", env=env).returncode == 0
    jobs = [f"st-{i}" for i in range(1000)]
    events = [
        e
        for j in jobs
        for e in (lifecycle(j, JobStatus.RUNNING), exit_event(j, "site-1", Code.EXCEPTION, 101))
    ]
    log = tmp_path / "daemon.log"
    daemon = _start(env, log)
    try:
        send(amqp_url, namespace, events)
        wait_until(lambda: _applied_rows(store_url) > 0, timeout=30)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    daemon = _start(env, log)
    try:
        wait_until(lambda: _applied_rows(store_url) == len(events), timeout=60)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()
    store = open_store(store_url)
    try:
        for job_id in jobs:
            job = store.get(job_id)
            assert job is not None and job.status is JobStatus.FINISHED_EXECUTION_EXCEPTION
            assert [r.outcome.value for r in job.history] == ["applied", "applied"]
            assert all(r.duplicates == 0 for r in job.history), job.as_json()
    finally:
        store.close()


def test_jobs_show_and_list(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = _env(amqp_url, namespace, store_url)
    log = tmp_path / "daemon.log"
    assert _exitpipe("topology", env=env).returncode == 0
    daemon = _start(env, log)
    try:
        send(
            amqp_url,
            namespace,
            [
                lifecycle("show-1", JobStatus.RUNNING, ["site-1"]),
                exit_event("show-1", "site-1", Code.CONFIG_ERROR, 103, reason="bad config"),
                lifecycle("show-2", JobStatus.SUBMITTED),
            ],
        )
        wait_until(lambda: _applied_rows(store_url) == 3, timeout=30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()

    shown = _exitpipe("jobs", "show", "show-1", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "FINISHED:EXECUTION_EXCEPTION"
    assert job["sites"] == ["site-1"]
    assert [r["kind"] for r in job["history"]] == ["lifecycle", "transition"]
    row = job["history"][1]
    assert row["policy"] == {
        "name": "nvflare-2.8",
        "version": row["policy"]["version"],
        "rule": "fail-on-exception",
    }
    assert (row["code"], row["return_code"], row["action"], row["outcome"]) == (
        "CONFIG_ERROR",
        103,
        "fail",
        "applied",
    )
    assert row["status_before"] == "RUNNING" and row["duplicates"] == 0
    assert set(row) == {
        "event_id",
        "kind",
        "site",
        "code",
        "return_code",
        "action",
        "outcome",
        "status_before",
        "status_after",
        "occurred_at",
        "recorded_at",
        "policy",
        "duplicates",
    }

    text = _exitpipe("jobs", "show", "show-1", env=env)
    assert (
        "fail-on-exception" in text.stdout
        and "RUNNING -> FINISHED:EXECUTION_EXCEPTION" in text.stdout
    )

    missing = _exitpipe("jobs", "show", "no-such-job", "--json", env=env)
    assert missing.returncode == 1 and missing.stdout == "" and "no-such-job" in missing.stderr

    listed = json.loads(_exitpipe("jobs", "list", "--json", env=env).stdout)
    assert {j["job_id"]: j["status"] for j in listed} == {
        "show-1": "FINISHED:EXECUTION_EXCEPTION",
        "show-2": "SUBMITTED",
    }
    only = json.loads(_exitpipe("jobs", "list", "--status", "SUBMITTED", "--json", env=env).stdout)
    assert [j["job_id"] for j in only] == ["show-2"]
    assert set(only[0]) == {"job_id", "status", "server_status", "updated_at"}
