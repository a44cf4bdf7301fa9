"""The launcher's exit mapping: FLARE's table, its two improvements, and the rc file."""

from __future__ import annotations

import pytest

from producers.launch import WorkerExit, exit_event, exit_status, map_exit
from schemas.codes import Code, Launcher

C = Code


@pytest.mark.parametrize(
    ("returncode", "code"),
    [
        (0, C.SUCCESS),
        (1, C.EXECUTION_ERROR),
        (9, C.ABORTED),
        (101, C.EXCEPTION),
        (102, C.UNSAFE_COMPONENT),
        (103, C.CONFIG_ERROR),
        (2, C.EXECUTION_ERROR),
        (127, C.EXECUTION_ERROR),
        (137, C.EXECUTION_ERROR),
        (255, C.EXECUTION_ERROR),
        (-9, C.EXECUTION_ERROR),
        (-15, C.EXECUTION_ERROR),
    ],
)
def test_a_worker_that_was_not_stopped_maps_like_flare_with_the_fl_codes(
    returncode: int, code: Code
) -> None:
    assert map_exit(returncode, stopped=False) is code


@pytest.mark.parametrize("returncode", [0, 1, 9, 101, 103, 143, -15, -2, -9])
def test_a_worker_stopped_through_launch_is_aborted_whatever_it_exited_with(
    returncode: int,
) -> None:
    assert map_exit(returncode, stopped=True) is C.ABORTED


@pytest.mark.parametrize(
    ("returncode", "status"), [(0, 0), (3, 3), (137, 137), (-9, 137), (-15, 143)]
)
def test_exit_status_is_the_shells(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_the_rc_file_wins_over_the_process_value_and_the_reason_keeps_both() -> None:
    worker = WorkerExit(returncode=1, written=101)
    assert (worker.return_code, worker.code) == (101, C.EXCEPTION)
    assert worker.reason() == "rc file said 101, process exited 1"


def test_without_an_rc_file_the_raw_process_value_is_reported() -> None:
    worker = WorkerExit(returncode=-9)
    assert (worker.return_code, worker.code) == (-9, C.EXECUTION_ERROR)
    assert worker.reason() == "worker killed by SIGKILL"


def test_a_worker_that_could_not_start_is_the_launchers_exception() -> None:
    worker = WorkerExit(returncode=127, failed_to_start="nope: No such file or directory")
    assert worker.code is C.EXCEPTION
    assert "could not start the worker" in (worker.reason() or "")


def test_the_exit_event_carries_code_raw_value_and_both_reasons() -> None:
    worker = WorkerExit(returncode=-15, stopped=True)
    event = exit_event("job-1", "site-1", Launcher.K8S, worker, "preempted")
    assert (event.code, event.return_code, event.launcher) == (C.ABORTED, -15, Launcher.K8S)
    assert event.reason == (
        "preempted; worker killed by SIGTERM; launch was told to stop and forwarded the signal"
    )


def test_a_clean_exit_has_no_reason() -> None:
    event = exit_event("job-1", "site-1", Launcher.PROCESS, WorkerExit(0), None)
    assert (event.code, event.return_code, event.reason) == (C.SUCCESS, 0, None)
