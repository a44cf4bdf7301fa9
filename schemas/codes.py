"""FLARE's exit codes (2.8 and 2.9) and job statuses (DESIGN section 2a).

FLARE keeps these as plain integers; ``JobReturnCode`` extends ``ProcessExitCode`` so one
integer never means two things, which lets a single table map both ways.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Code(IntEnum):
    """An exit code by name, with the integer FLARE gives it."""

    SUCCESS = 0
    EXECUTION_ERROR = 1
    ABORTED = 9
    EXCEPTION = 101
    UNSAFE_COMPONENT = 102
    CONFIG_ERROR = 103
    INFRASTRUCTURE_ERROR = 104  # FLARE 2.9; not in 2.8
    UNKNOWN = 127


CODE_NAMES: frozenset[str] = frozenset(c.name for c in Code)
_BY_VALUE = {c.value: c for c in Code}


def code_for_value(value: int) -> Code:
    """The code a raw integer means; an integer outside the table is UNKNOWN."""
    return _BY_VALUE.get(value, Code.UNKNOWN)


class JobStatus(StrEnum):
    """FLARE's job statuses, used by the store as they are."""

    SUBMITTED = "SUBMITTED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    FINISHED_COMPLETED = "FINISHED:COMPLETED"
    FINISHED_EXECUTION_EXCEPTION = "FINISHED:EXECUTION_EXCEPTION"
    FINISHED_ABORTED = "FINISHED:ABORTED"
    FINISHED_ABNORMAL = "FINISHED:ABNORMAL"
    FINISHED_CAN_NOT_SCHEDULE = "FINISHED:CAN_NOT_SCHEDULE"
    FINISHED_FAILED_TO_RUN = "FINISHED:FAILED_TO_RUN"
    FINISHED_ABANDONED = "FINISHED:ABANDONED"

    @property
    def terminal(self) -> bool:
        """Every FINISHED:* status is terminal and absorbing."""
        return self.value.startswith("FINISHED:")

    @property
    def rank(self) -> int:
        """SUBMITTED < DISPATCHED < RUNNING < FINISHED:* (all terminals rank alike)."""
        return _RANK.get(self, 3)


_RANK = {JobStatus.SUBMITTED: 0, JobStatus.DISPATCHED: 1, JobStatus.RUNNING: 2}
TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(s for s in JobStatus if s.terminal)


class Action(StrEnum):
    """What a policy decides for an exit."""

    FAIL = "fail"
    STOP = "stop"
    IGNORE = "ignore"


TARGET_STATUS: dict[Action, JobStatus] = {
    Action.FAIL: JobStatus.FINISHED_EXECUTION_EXCEPTION,
    Action.STOP: JobStatus.FINISHED_ABORTED,
}


class Stage(StrEnum):
    """How far the worker got before it exited, as its launcher saw it."""

    STARTING = "starting"  # it exited before it reported itself started
    STARTED = "started"


class Launcher(StrEnum):
    """Where the worker ran."""

    PROCESS = "process"
    DOCKER = "docker"
    K8S = "k8s"
    OTHER = "other"
