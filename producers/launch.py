"""Run a worker, map its exit to a FLARE code, report it, and exit as the worker did.

The mapping is FLARE's process launcher's (0 SUCCESS, 1 EXECUTION_ERROR, 9 ABORTED, anything
else EXECUTION_ERROR) with two changes: 101, 102 and 103 keep their own meaning (EXCEPTION,
UNSAFE_COMPONENT, CONFIG_ERROR), and a worker that ends after ``launch`` was told to stop
(``launch`` got SIGTERM or SIGINT and forwarded it) is ABORTED whatever it exited with.

Which integer is the return code: the one the worker wrote to its rc file (``--rc-file``,
FLARE's ``_process_rc.txt``) when it wrote one during this run, else the process's own, as
Python's Popen reports it (death by signal N is -N). It is what the mapping uses and what the
event carries as ``return_code``; the reason records the process's value when they differ.

``launch`` itself exits with the worker's status (128+N after death by signal N), also when
the event could only be spooled: the worker's status matters more to whoever started it than
the report's fate, which stderr tells, and which ``exitpipe spool flush`` completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TextIO

from producers.deliver import Status, deliver
from producers.publisher import Publisher, outgoing
from producers.spool import Spool
from schemas.codes import Code, Launcher
from schemas.events import ExitEvent
from schemas.topology import Names

# FLARE's process launcher, plus the codes a worker can only mean on purpose.
EXIT_CODES: dict[int, Code] = {
    0: Code.SUCCESS,
    1: Code.EXECUTION_ERROR,
    9: Code.ABORTED,
    101: Code.EXCEPTION,
    102: Code.UNSAFE_COMPONENT,
    103: Code.CONFIG_ERROR,
}
FORWARDED = (signal.SIGTERM, signal.SIGINT)
NOT_FOUND, NOT_EXECUTABLE = 127, 126  # the shell's statuses for a command that cannot run
_INT32 = range(-(2**31), 2**31)


def map_exit(returncode: int, stopped: bool) -> Code:
    """The code a worker's exit means; ``stopped``: it ended because launch was told to stop."""
    if stopped:
        return Code.ABORTED
    return EXIT_CODES.get(returncode, Code.EXECUTION_ERROR)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a Popen return code: 128+N after death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended."""

    returncode: int  # the process's, as Popen reports it
    stopped: bool = False  # launch forwarded SIGTERM or SIGINT to it
    written: int | None = None  # what it wrote to its rc file during this run
    failed_to_start: str | None = None  # why it could not be run at all

    @property
    def return_code(self) -> int:
        """The rc file's integer when written, else the process's."""
        return self.returncode if self.written is None else self.written

    @property
    def code(self) -> Code:
        """The code to report; a worker that could not be run is the launcher's EXCEPTION."""
        if self.failed_to_start is not None:
            return Code.EXCEPTION
        return map_exit(self.return_code, self.stopped)

    def reason(self) -> str | None:
        """What the numbers alone do not say."""
        notes = []
        if self.failed_to_start is not None:
            notes.append(f"could not start the worker: {self.failed_to_start}")
        if self.returncode < 0:
            notes.append(f"worker killed by {_signal_name(-self.returncode)}")
        if self.stopped:
            notes.append("launch was told to stop and forwarded the signal")
        if self.written is not None and self.written != self.returncode:
            notes.append(f"rc file said {self.written}, process exited {self.returncode}")
        return "; ".join(notes) or None


def exit_event(
    job: str, site: str, launcher: Launcher, worker: WorkerExit, reason: str | None
) -> ExitEvent:
    """The exit event for ``worker``; ``reason`` (the user's) comes before the notes."""
    text = "; ".join(t for t in (reason, worker.reason()) if t) or None
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        launcher=launcher,
        code=worker.code,
        return_code=worker.return_code,
        reason=text[:4096] if text else None,
        occurred_at=datetime.now(UTC),
    )


class _Forwarder:
    """Forwards SIGTERM and SIGINT to the worker and remembers that it did."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.early: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.process is None:
            self.stopped = True
            self.early.append(signum)  # arrived before the worker was started
        elif self.process.returncode is None:
            self.stopped = True
            self.process.send_signal(signum)
        # After the worker ended the signal is ignored: the report is bounded by its retries.

    def start(self, command: Sequence[str]) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(command)  # stdin, stdout, stderr are the worker's
        for signum in self.early:
            self.process.send_signal(signum)
        return self.process


def _run(forwarder: _Forwarder, command: Sequence[str], rc_file: Path | None) -> WorkerExit:
    before = _stamp(rc_file)
    try:
        process = forwarder.start(command)
    except OSError as exc:  # not found, not executable, not a binary: the shell's 127 or 126
        status = NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
        why = f"{command[0]}: {exc.strerror or exc}"
        return WorkerExit(status, forwarder.stopped, None, why)
    returncode = process.wait()
    return WorkerExit(returncode, forwarder.stopped, _written(rc_file, before))


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None


_RC_FILE_MAX = 64


def _written(path: Path | None, before: tuple[int, int, int] | None) -> int | None:
    """The rc file's integer if the worker wrote it during this run."""
    after = _stamp(path)
    if path is None or after is None or after == before:
        return None
    try:
        with path.open("rb") as f:
            head = f.read(_RC_FILE_MAX + 1)  # a worker may write anything there: read a little
        if len(head) > _RC_FILE_MAX:
            raise ValueError(f"more than {_RC_FILE_MAX} bytes, not a return code")
        value = int(head.decode("utf-8").strip())
        if value not in _INT32:
            raise ValueError(f"{value} is not a 32-bit integer")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        print(f"exitpipe launch: ignoring rc file {path}: {exc}", file=sys.stderr)
        return None
    return value


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class Report:
    """Where to report: the exchange names, the publisher, the spool."""

    names: Names
    publisher: Publisher
    spool: Spool


def launch(
    command: Sequence[str],
    *,
    job: str,
    site: str,
    launcher: Launcher,
    reason: str | None,
    report: Report,
    rc_file: Path | None = None,
    err: TextIO = sys.stderr,
) -> int:
    """Run the worker, report its exit, and return the worker's exit status.

    SIGTERM and SIGINT are forwarded to the worker while it runs (from a terminal, Ctrl-C
    reaches the worker twice: directly, as it shares the terminal, and forwarded). While
    the exit is being reported they are ignored: the report is bounded by the publisher's
    retries, and the event is spooled before it is sent, so even a SIGKILL cannot lose it.
    """
    forwarder = _Forwarder()
    with _handling(forwarder):
        worker = _run(forwarder, command, rc_file)
        _report(exit_event(job, site, launcher, worker, reason), report, err)
    return exit_status(worker.returncode)


@contextmanager
def _handling(forwarder: _Forwarder) -> Iterator[None]:
    previous = {signum: signal.signal(signum, forwarder) for signum in FORWARDED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _report(event: ExitEvent, report: Report, err: TextIO) -> None:
    delivery = deliver(report.publisher, report.spool, [outgoing(report.names, event)])
    for line in delivery.problems:
        print(f"exitpipe launch: {line}", file=err)
    if delivery.status is Status.SPOOLED:
        print(
            f"exitpipe launch: exit event {event.event_id} kept in the spool"
            f" {report.spool.directory}; `exitpipe spool flush` delivers it",
            file=err,
        )
    elif delivery.status is Status.LOST:
        print(f"exitpipe launch: exit event {event.event_id} could not be reported", file=err)
