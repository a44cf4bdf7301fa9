"""``exitpipe launch`` as a subprocess around small Python workers, on a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika
import pytest

from producers.broker import declare_topology
from schemas.codes import Code
from schemas.events import ExitEvent, parse_body
from schemas.topology import Names, topology

pytestmark = pytest.mark.e2e

WAIT_FOR_STOP = """
import signal, sys, time
def stop(signum, frame):
    print(f"worker got {signum}", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(30)
"""


@pytest.fixture
def names(amqp_url: str, namespace: str) -> Names:
    declare_topology(amqp_url, topology(namespace))
    return Names(namespace)


def launch_args(url: str, names: Names, spool: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "exitpipe.cli",
        "launch",
        "--amqp-url",
        url,
        "--namespace",
        names.ns,
        "--spool-dir",
        str(spool),
        "--retry-seconds",
        "1",
        "--job",
        "job-1",
        "--site",
        "site-1",
        *extra,
    ]


def python(code: str) -> list[str]:
    return ["--", sys.executable, "-c", code]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=30, **kwargs)


def reported(amqp_url: str, names: Names) -> ExitEvent:
    """The one exit event in the namespace's classify queue."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    bodies = []
    for method, _, body in channel.consume(names.classify, auto_ack=True, inactivity_timeout=0.3):
        if method is None:
            break
        bodies.append(body)
    conn.close()
    (body,) = bodies
    event = parse_body(body)
    assert isinstance(event, ExitEvent)
    return event


def test_streams_and_status_pass_through_and_success_is_reported(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    worker = "import sys; print('out', input()); print('err', file=sys.stderr)"
    done = run(launch_args(amqp_url, names, tmp_path) + python(worker), input="hello\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "out hello\n", "err\n")
    event = reported(amqp_url, names)
    assert (event.job_id, event.site, event.code, event.return_code) == (
        "job-1",
        "site-1",
        Code.SUCCESS,
        0,
    )
    assert event.effective_launcher.value == "process" and event.reason is None


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (1, Code.EXECUTION_ERROR),
        (9, Code.ABORTED),
        (101, Code.EXCEPTION),
        (103, Code.CONFIG_ERROR),
        (137, Code.EXECUTION_ERROR),
    ],
)
def test_an_exit_status_is_mapped_and_passed_on(
    amqp_url: str, names: Names, tmp_path: Path, status: int, code: Code
) -> None:
    done = run(launch_args(amqp_url, names, tmp_path) + python(f"raise SystemExit({status})"))
    assert done.returncode == status, done.stderr
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (code, status)


def test_death_by_sigkill_is_an_execution_error_with_the_raw_value(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    worker = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    done = run(launch_args(amqp_url, names, tmp_path, "--launcher", "k8s") + python(worker))
    assert done.returncode == 137
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (Code.EXECUTION_ERROR, -9)
    assert event.reason == "worker killed by SIGKILL" and event.effective_launcher.value == "k8s"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_launch_reaches_the_worker_and_is_aborted(
    amqp_url: str, names: Names, tmp_path: Path, signum: signal.Signals
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    args = launch_args(amqp_url, names, tmp_path) + python(WAIT_FOR_STOP)
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        out, _ = process.communicate(timeout=20)
    assert out == f"worker got {int(signum)}\n"
    assert process.returncode == 3
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (Code.ABORTED, 3)
    assert "forwarded the signal" in (event.reason or "")


def test_the_rc_file_written_by_the_worker_is_the_return_code(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    rc_file = tmp_path / "_process_rc.txt"
    worker = f"open({str(rc_file)!r}, 'w').write('101'); raise SystemExit(1)"
    extra = ("--rc-file", str(rc_file), "--reason", "model diverged")
    done = run(launch_args(amqp_url, names, tmp_path / "spool", *extra) + python(worker))
    assert done.returncode == 1  # launch exits as the process did
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (Code.EXCEPTION, 101)
    assert event.reason == "model diverged; rc file said 101, process exited 1"


def test_a_huge_rc_file_is_ignored_not_read(amqp_url: str, names: Names, tmp_path: Path) -> None:
    rc_file = tmp_path / "_process_rc.txt"
    worker = f"open({str(rc_file)!r}, 'w').write('1' * 10_000_000); raise SystemExit(9)"
    extra = ("--rc-file", str(rc_file))
    done = run(launch_args(amqp_url, names, tmp_path / "spool", *extra) + python(worker))
    assert done.returncode == 9
    assert "more than 64 bytes" in done.stderr
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (Code.ABORTED, 9)


def test_a_stale_rc_file_from_an_earlier_run_is_ignored(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    rc_file = tmp_path / "_process_rc.txt"
    rc_file.write_text("103")
    extra = ("--rc-file", str(rc_file))
    done = run(launch_args(amqp_url, names, tmp_path / "spool", *extra) + python("pass"))
    assert done.returncode == 0
    assert (reported(amqp_url, names).code, rc_file.read_text()) == (Code.SUCCESS, "103")


def test_a_command_that_cannot_run_is_reported_as_the_launchers_exception(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    done = run([*launch_args(amqp_url, names, tmp_path), "--", str(tmp_path / "no-such-worker")])
    assert done.returncode == 127
    event = reported(amqp_url, names)
    assert (event.code, event.return_code) == (Code.EXCEPTION, 127)
    assert "could not start the worker" in (event.reason or "")


def test_with_the_broker_away_the_event_is_spooled_and_the_workers_status_kept(
    names: Names, tmp_path: Path
) -> None:
    nowhere = "amqp://guest:guest@127.0.0.1:1/%2F"
    done = run(launch_args(nowhere, names, tmp_path) + python("raise SystemExit(101)"))
    assert done.returncode == 101
    assert "kept in the spool" in done.stderr and "guest:guest" not in done.stderr
    (spooled,) = tmp_path.glob("*.json")
    event = parse_body(json.loads(spooled.read_text())["body"].encode())
    assert isinstance(event, ExitEvent) and (event.code, event.return_code) == (Code.EXCEPTION, 101)


def test_bad_arguments_exit_2_before_the_worker_runs(
    amqp_url: str, names: Names, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    args = launch_args(amqp_url, names, tmp_path, "--launcher", "slurm")
    done = run(args + python(f"open({str(marker)!r}, 'w')"))
    assert done.returncode == 2 and "launcher" in done.stderr
    assert not marker.exists()
