"""The command line: each command's module, and a quick exit that loses no output."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from exitpipe.cli import COMMAND_MODULES, _common_parser
from schemas.codes import Code, JobStatus
from schemas.events import ExitEvent, LifecycleEvent


@pytest.mark.parametrize("module", sorted(COMMAND_MODULES))
def test_each_module_adds_the_commands_the_table_names(module: str) -> None:
    # `exitpipe COMMAND` imports only the module the table names for COMMAND.
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    importlib.import_module(f"exitpipe.commands.{module}").register(subparsers, _common_parser())
    assert tuple(subparsers.choices) == COMMAND_MODULES[module]


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for commands in COMMAND_MODULES.values():
        for command in commands:
            assert command in out


def test_replay_exits_at_once_with_all_of_its_output(tmp_path: Path) -> None:
    # More output than a pipe holds, and less than a buffer: the quick exit flushes it first.
    path = tmp_path / "events.jsonl"
    when = datetime(2026, 1, 31, 12, tzinfo=UTC)
    with path.open("wb") as f:
        for n in range(2000):
            job = f"job-{n}"
            events = [
                LifecycleEvent(
                    event_id=uuid.uuid4(),
                    job_id=job,
                    status=JobStatus.RUNNING,
                    sites=["s1"],
                    occurred_at=when,
                ),
                ExitEvent(
                    event_id=uuid.uuid4(),
                    job_id=job,
                    site="s1",
                    code=Code.EXCEPTION,
                    occurred_at=when,
                ),
            ]
            for event in events:
                f.write(event.to_json() + b"\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as usual
    for extra in (["--json"], []):
        run = subprocess.run(
            [sys.executable, "-m", "exitpipe.cli", "replay", "--file", str(path), *extra],
            capture_output=True,
            check=False,
            env=env,
        )
        assert run.returncode == 0, run.stderr
        assert b"4000 events in" in run.stderr
        if extra:
            out = json.loads(run.stdout)
            assert len(out["jobs"]) == 2000
            assert {j["status"] for j in out["jobs"]} == {"FINISHED:EXECUTION_EXCEPTION"}
        else:
            assert run.stdout.count(b"final status: FINISHED:EXECUTION_EXCEPTION") == 2000
    # And as little output as stays in a buffer.
    one = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", "replay", "--file", str(path), "--job", "job-7"],
        capture_output=True,
        check=False,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(b"job job-7 ")
    assert one.stdout.endswith(b"(fail by nvflare-2.8:fail-on-exception (s1 EXCEPTION))\n")
