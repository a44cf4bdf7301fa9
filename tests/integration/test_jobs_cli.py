"""``jobs show`` / ``jobs list`` against the running daemons (issue 12, DESIGN 6).

A FLARE 2.9-like job: site-1's worker fails while starting (exit 1, stage ``starting``), site-2's
is aborted afterwards, and the server's verdict is FINISHED:ABNORMAL. Under nvflare-2.8 exitpipe
fails the job first (FINISHED:EXECUTION_EXCEPTION), so the two part ways; under nvflare-2.9 the
replay of the archive gives the server's verdict, by the ``failed-while-starting`` rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumers.store.factory import open_store
from schemas.codes import Code, JobStatus, Stage
from schemas.events import ExitEvent
from tests.support.pipeline import lifecycle, now, running, send, settings_for, wait_until

pytestmark = pytest.mark.integration


def _exit(job: str, site: str, code: Code, rc: int, stage: Stage) -> ExitEvent:
    return ExitEvent.model_validate(
        {
            "event_id": os.urandom(16).hex(),
            "job_id": job,
            "site": site,
            "code": code.name,
            "return_code": rc,
            "stage": stage.value,
            "occurred_at": now(),
        }
    )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _json(*args: str, env: dict[str, str]) -> Any:
    done = _cli(*args, "--json", env=env)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_jobs_show_and_list_tell_exits_server_verdicts_and_disagreements(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = {
        **os.environ,
        "EXITPIPE_AMQP_URL": amqp_url,
        "EXITPIPE_NAMESPACE": namespace,
        "EXITPIPE_STORE": store,
        "EXITPIPE_POLICY": "nvflare-2.8",
    }
    starting = _exit("f-1", "site-1", Code.EXECUTION_ERROR, 1, Stage.STARTING)
    aborted = _exit("f-1", "site-2", Code.ABORTED, 0, Stage.STARTED)
    with running(settings_for(amqp_url, namespace, store)):
        send(amqp_url, namespace, [lifecycle("f-1", JobStatus.RUNNING, ["site-1", "site-2"])])
        send(amqp_url, namespace, [lifecycle("f-2", JobStatus.RUNNING, ["site-1"])])
        send(amqp_url, namespace, [starting])
        send(amqp_url, namespace, [aborted])
        send(amqp_url, namespace, [lifecycle("f-1", JobStatus.FINISHED_ABNORMAL)])
        send(amqp_url, namespace, [lifecycle("f-2", JobStatus.FINISHED_COMPLETED)])

        def recorded() -> bool:
            s = open_store(store)
            try:
                a, b = s.get("f-1"), s.get("f-2")
                return bool(a and b and len(a.history) == 3 and len(b.history) == 2)
            finally:
                s.close()

        wait_until(recorded, timeout=20)

    shown = _json("jobs", "show", "f-1", env=env)
    # nvflare-2.8 ignores exit 1 and stops the job on site-2's ABORTED; the server said ABNORMAL.
    assert shown["status"] == "FINISHED:ABORTED"
    assert shown["server_status"] == "FINISHED:ABNORMAL"
    exits = [(e["site"], e["code"], e["return_code"], e["stage"], e["decision"], e["rule"])
             for e in shown["exits"]]  # fmt: skip
    assert exits == [
        ("site-1", "EXECUTION_ERROR", 1, "starting", "ignore", "default"),
        ("site-2", "ABORTED", 0, "started", "stop", "stop-on-abort"),
    ]
    assert shown["exits"][0]["event_id"] == str(starting.event_id)
    assert _json("jobs", "show", "f-2", env=env)["exits"] == []

    listed = {j["job_id"]: j for j in _json("jobs", "list", env=env)}
    assert listed["f-2"]["server_status"] == listed["f-2"]["status"] == "FINISHED:COMPLETED"
    disagreements = _json("jobs", "list", "--disagreements", env=env)
    assert [j["job_id"] for j in disagreements] == ["f-1"]
    text = _cli("jobs", "show", "f-1", env=env).stdout
    assert "server verdict: FINISHED:ABNORMAL (DISAGREES)" in text
    assert "starting" in text  # the exits table

    replayed = _json("replay", "--policy", "nvflare-2.9", "--job", "f-1", env=env)
    (job,) = replayed["jobs"]
    assert job["status"] == "FINISHED:ABNORMAL" == job["server_status"]
    decided = [(e["event_id"], e["decision"], e["rule"]) for e in job["exits"]]
    assert decided == [
        (str(starting.event_id), "fail", "failed-while-starting"),
        (str(aborted.event_id), "stop", "stop-on-abort"),
    ]
    deciding = next(
        r for r in job["history"] if r["outcome"] == "applied" and r["kind"] == "transition"
    )
    assert deciding["policy"]["rule"] == "failed-while-starting"
