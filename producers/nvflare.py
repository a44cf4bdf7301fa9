"""NVIDIA FLARE 2.9 components that publish worker exits and job verdicts (DESIGN 8).

The only module of exitpipe that imports ``nvflare``. Both components are configured in a
site's ``local/resources.json`` (``exitpipe nvflare install`` writes the entries):

- ``ClientProcessJobLauncher`` (client site, component id ``process_launcher``) launches the
  worker exactly as FLARE's own launcher does (it is a subclass and calls ``launch_job``) and
  wraps the handle, so that when FLARE's ``wait()`` returns one exit event is published:
  the worker's real exit status (FLARE's handle maps 101-103 and signals to 1), ABORTED when
  FLARE asked the worker to abort or killed it, and the worker's stage as FLARE saw it.
- ``LifecycleReporter`` (server, any id) publishes RUNNING with the job's client sites when
  FLARE starts a job, and the final FINISHED:* status as FLARE stored it when the job ends.

FLARE's threads are never held for more than ``max_block_seconds`` (2 s by default): each
event is delivered by a daemon thread through ``producers.deliver``, which writes it to the
spool before sending, so an event the broker does not confirm in time stays in the spool and
the next event of that site (or ``exitpipe spool flush``) delivers it. Nothing here raises
into FLARE: a failure is logged with its reason and counted (``failures()``).

FLARE internals read here are private and may move; every read is guarded, and a missing
one only drops ``stage`` (launcher) or ``sites`` (reporter): the client executor's
``run_processes`` and ``lock``, its ``"_abort_requested"`` key and ``RunProcessKey.STATUS``
(``private/fed/client/client_executor.py``), and the server engine's
``run_processes[job]["_participants"]`` (``private/fed/server/server_engine.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, RunProcessKey
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.job_launcher.client_process_launcher import (
    ClientProcessJobLauncher as FlareClientProcessJobLauncher,
)
from nvflare.app_common.job_launcher.process_launcher import (
    JOB_RETURN_CODE_MAPPING,
    ProcessHandle,
)
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producers.connection import parse_urls
from producers.deliver import Status, deliver
from producers.errors import BrokerError, redact
from producers.publisher import Outgoing, Publisher, outgoing
from producers.spool import Spool, default_spool
from schemas.codes import Code, Launcher, Stage, code_for_value
from schemas.events import MAX_REASON_CHARS, ExitEvent, LifecycleEvent, describe
from schemas.topology import Names

log = logging.getLogger("exitpipe.nvflare")

# FLARE's ClientStatus (private/fed/client/client_status.py), copied: importing a private
# module would break the whole component if it moved, where a changed value only costs stage.
STARTING, STARTED, STOPPED = 1, 2, 3
_FLARE_STAGES = {STARTING: "STARTING", STARTED: "STARTED", STOPPED: "STOPPED"}
_ABORT_REQUESTED = "_abort_requested"  # client_executor.py: set by abort_app, never cleared
INFRASTRUCTURE_ERROR, EXCEPTION, UNKNOWN = 104, 101, 127
CONNECT_TIMEOUT = 5.0
LOCK_TIMEOUT = 1.0  # reading FLARE's table of workers must not hang FLARE's thread either
REMEMBERED_JOBS = 10_000  # finished jobs the reporter remembers, to publish each verdict once


# -- settings --------------------------------------------------------------------------------


class ComponentSettings(BaseSettings):
    """The few settings the components need, from their ``args`` else ``EXITPIPE_*``.

    The defaults are ``exitpipe.settings.Settings``'s (a unit test keeps them equal): the
    producers may not import the composition root.
    """

    model_config = SettingsConfigDict(env_prefix="EXITPIPE_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    amqp_ca_file: Path | None = None
    namespace: str = Field("exitpipe", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    spool_dir: Path = Field(default_factory=default_spool)
    heartbeat: int = Field(30, ge=1, le=600)
    retry_seconds: float = Field(30.0, gt=0)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        parse_urls(value)  # one URL or a cluster's list, as for every command
        return value


# -- failures --------------------------------------------------------------------------------

_failures: Counter[str] = Counter()
_failures_lock = threading.Lock()


def failed(kind: str, message: str, *args: object) -> None:
    """Log a failure with its reason and count it under ``kind``; never raises."""
    with _failures_lock:
        _failures[kind] += 1
    log.warning("exitpipe: " + message, *args)


def failures() -> dict[str, int]:
    """How many failures of each kind this process has had (``invalid_event``, ``spooled``...)."""
    with _failures_lock:
        return dict(_failures)


# -- delivery --------------------------------------------------------------------------------


class Courier:
    """Delivers a component's events without ever holding FLARE's thread for long.

    Each participant (site or server) has a spool of its own: with per-site broker users
    (DESIGN 4a) a site may publish only its own exits, so flushing another site's spool
    would be refused. A ``spool_dir`` given in the component's ``args`` is that site's
    already; otherwise it is ``<spool_dir>/nvflare-<participant>``.
    """

    def __init__(self, settings: ComponentSettings, block_seconds: float, own_spool: bool) -> None:
        self.settings = settings
        self.block_seconds = block_seconds
        self.own_spool = own_spool
        self.names = Names(settings.namespace)

    def spool_for(self, participant: str) -> Spool:
        """The spool of ``participant``."""
        if self.own_spool:
            return Spool(self.settings.spool_dir)
        return Spool(self.settings.spool_dir / f"nvflare-{participant}")

    def send(self, event: ExitEvent | LifecycleEvent, participant: str) -> None:
        """Deliver ``event`` on a daemon thread, waiting for it ``block_seconds`` at most."""
        message = outgoing(self.names, event)
        spool = self.spool_for(participant)
        worker = threading.Thread(
            target=self._deliver,
            args=(event, message, spool),
            name=f"exitpipe-deliver-{event.event_id}",
            daemon=True,
        )
        worker.start()
        worker.join(self.block_seconds)
        if worker.is_alive():
            failed(
                "slow",
                "event %s of job %s not confirmed within %.1fs; FLARE goes on, the event is"
                " kept in the spool %s until the broker takes it",
                event.event_id,
                event.job_id,
                self.block_seconds,
                spool.directory,
            )

    def _deliver(self, event: ExitEvent | LifecycleEvent, message: Outgoing, spool: Spool) -> None:
        try:
            self._deliver_or_keep(event, message, spool)
        except Exception as exc:  # a daemon thread's exception would only reach stderr
            failed("error", "delivering event %s of job %s: %r", event.event_id, event.job_id, exc)

    def _deliver_or_keep(
        self, event: ExitEvent | LifecycleEvent, message: Outgoing, spool: Spool
    ) -> None:
        try:
            publisher = self._publisher()
        except BrokerError as exc:  # a bad URL or CA file: keep the event for a later flush
            spool.put(message)
            failed(
                "spooled", "event %s of job %s kept in %s: %s", *_ids(event), spool.directory, exc
            )
            return
        with publisher:
            delivery = deliver(publisher, spool, [message])
        why = "; ".join(delivery.problems)
        if delivery.status is Status.DELIVERED:
            log.info("exitpipe: event %s of job %s published", *_ids(event))
        elif delivery.status is Status.SPOOLED:
            failed(
                "spooled", "event %s of job %s kept in %s: %s", *_ids(event), spool.directory, why
            )
        else:
            failed("lost", "event %s of job %s neither published nor kept: %s", *_ids(event), why)

    def _publisher(self) -> Publisher:
        s = self.settings
        return Publisher(
            s.amqp_url,
            heartbeat=s.heartbeat,
            retry_seconds=s.retry_seconds,
            connect_timeout=min(CONNECT_TIMEOUT, s.retry_seconds),
            ca_file=s.amqp_ca_file,
        )


def _ids(event: ExitEvent | LifecycleEvent) -> tuple[object, str]:
    return event.event_id, event.job_id


def courier(block_seconds: float, **args: object) -> Courier | None:
    """The courier a component's ``args`` configure, or None (logged) when they are wrong.

    A wrong setting disables reporting rather than the site: FLARE keeps launching workers.
    """
    given = {key: value for key, value in args.items() if value is not None}
    if "ca_file" in given:
        given["amqp_ca_file"] = given.pop("ca_file")
    try:
        settings = ComponentSettings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        failed("settings", "settings refused, nothing will be reported: %s", describe(exc))
        return None
    log.info(
        "exitpipe: reporting to %s namespace %s",
        redact(settings.amqp_url),
        settings.namespace,
    )
    return Courier(settings, float(block_seconds), own_spool="spool_dir" in given)


# -- client side: what a worker's end means ------------------------------------------------


@dataclass(frozen=True)
class WorkerEnd:
    """How a worker ended, as the launcher saw it when FLARE's ``wait()`` returned."""

    return_code: int | None  # the process's own status; -N after death by signal N
    flare_status: int | None  # FLARE's ClientStatus of the worker; None when unreadable
    abort_requested: bool = False  # FLARE asked the worker to abort (job abort, server stop)
    terminated: bool = False  # FLARE killed the worker's process group
    rc_file: int | None = None  # what the worker wrote to _process_rc.txt

    @property
    def stage(self) -> Stage | None:
        """``starting`` before the worker reported STARTED; STOPPED counts as started."""
        if self.flare_status == STARTING:
            return Stage.STARTING
        if self.flare_status in (STARTED, STOPPED):
            return Stage.STARTED
        return None

    @property
    def code(self) -> Code:
        """ABORTED when FLARE aborted or killed the worker, else the name of its status."""
        if self.terminated or self.abort_requested:
            return Code.ABORTED
        return Code.UNKNOWN if self.return_code is None else code_for_value(self.return_code)

    @property
    def flare_rc(self) -> int:
        """The RC FLARE 2.9.0 reports to its server for this end (client_executor.py)."""
        rc = _handle_rc(self.return_code)
        if self.rc_file is not None and rc != INFRASTRUCTURE_ERROR:
            rc = self.rc_file
        if rc == 1 and not self.abort_requested and self.flare_status == STARTING:
            return INFRASTRUCTURE_ERROR
        if rc == 1 and not self.abort_requested and self.flare_status == STARTED:
            return EXCEPTION
        return rc

    def reason(self) -> str:
        """What FLARE knows of this end, in words."""
        notes = [f"worker {_status_words(self.return_code)}"]
        if self.terminated:
            notes.append("terminated by FLARE (SIGKILL to the worker's process group)")
        elif self.abort_requested:
            notes.append("FLARE requested abort (job abort or server-side stop)")
        if self.rc_file is not None:
            notes.append(f"worker wrote {self.rc_file} to {FLMetaKey.PROCESS_RC_FILE}")
        notes.append(f"FLARE stage {_FLARE_STAGES.get(self.flare_status or 0, 'unknown')}")
        rc = self.flare_rc
        notes.append(f"FLARE reports RC {rc} ({code_for_value(rc).name})")
        return "; ".join(notes)[:MAX_REASON_CHARS]


def _handle_rc(return_code: int | None) -> int:
    """What FLARE's ``ProcessHandle.poll()`` makes of a status: 0, 1 or 9, else 1."""
    if return_code is None:
        return UNKNOWN
    return int(JOB_RETURN_CODE_MAPPING.get(return_code, 1))


def _status_words(return_code: int | None) -> str:
    if return_code is None:
        return "exit status unknown"
    if return_code >= 0:
        return f"exited with status {return_code}"
    try:
        return f"killed by {signal.Signals(-return_code).name} ({return_code})"
    except ValueError:
        return f"killed by signal {-return_code} ({return_code})"


def exit_event(job_id: str, site: str, end: WorkerEnd) -> ExitEvent:
    """The exit event of ``end`` (raises ValidationError for ids outside DESIGN 3's limits)."""
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job_id,
        site=site,
        launcher=Launcher.PROCESS,
        code=end.code,
        return_code=end.return_code,
        reason=end.reason(),
        stage=end.stage,
        occurred_at=datetime.now(UTC),
    )


# -- client side: the handle and the launcher ----------------------------------------------


@dataclass(frozen=True)
class _Worker:
    """Where one worker runs: its job, its site, FLARE's executor and the job's run folder."""

    job_id: str
    site: str
    executor: Any  # FLARE's JobExecutor (client_engine.client_executor)
    run_dir: Path | None


class ReportingProcessHandle(ProcessHandle):  # type: ignore[misc]
    """FLARE's ``ProcessHandle`` that publishes one exit event when the worker has ended.

    FLARE calls ``wait()`` and then ``poll()`` (``_wait_child_process_finish``); ``poll()``
    keeps FLARE's mapping, so FLARE behaves exactly as before. The event is built when
    ``wait()`` returns, while FLARE's entry for the worker still exists (it is removed only
    after FLARE's own report to its server): the stage read then is the one FLARE uses.
    """

    def __init__(self, adapter: Any, worker: _Worker, courier: Courier) -> None:
        super().__init__(process_adapter=adapter)
        self._worker = worker
        self._courier = courier
        self._lock = threading.Lock()
        self._reported = False
        self._terminated = False

    def terminate(self) -> None:
        """FLARE kills the worker (abort while starting, or 10 s after an ignored abort)."""
        self._terminated = True
        super().terminate()

    def wait(self) -> None:
        """Wait for the worker as FLARE does, then report its end."""
        try:
            super().wait()
        finally:
            self._report_once()

    def poll(self) -> Any:
        """FLARE's poll; an end seen here first (no ``wait()``) is reported too."""
        result = super().poll()
        try:
            if self.adapter.poll() is not None:
                self._report_once()
        except Exception as exc:
            failed("error", "job %s: polling the worker: %r", self._worker.job_id, exc)
        return result

    def _report_once(self) -> None:
        with self._lock:
            if self._reported:
                return
            self._reported = True
        worker = self._worker
        try:
            end = self._end()
            event = exit_event(worker.job_id, worker.site, end)
        except ValidationError as exc:
            failed("invalid_event", "job %s: exit event refused: %s", worker.job_id, describe(exc))
            return
        except Exception as exc:
            failed("error", "job %s: reading the worker's end: %r", worker.job_id, exc)
            return
        log.info("exitpipe: job %s event %s: %s", worker.job_id, event.event_id, event.reason)
        self._courier.send(event, worker.site)

    def _end(self) -> WorkerEnd:
        status, abort_requested = _flare_state(self._worker.executor, self._worker.job_id)
        return WorkerEnd(
            return_code=self.adapter.poll(),  # the real status (waitstatus_to_exitcode)
            flare_status=status,
            abort_requested=abort_requested,
            terminated=self._terminated,
            rc_file=_read_rc_file(self._worker.run_dir),
        )


def _flare_state(executor: Any, job_id: str) -> tuple[int | None, bool]:
    """FLARE's ClientStatus of the worker and whether FLARE asked it to abort (guarded)."""
    try:
        lock = executor.lock
        if not lock.acquire(timeout=LOCK_TIMEOUT):
            failed("flare_internals", "job %s: FLARE's executor lock is busy; no stage", job_id)
            return None, False
        try:
            entry = dict(executor.run_processes.get(job_id) or {})
        finally:
            lock.release()
    except Exception as exc:  # a FLARE version without these internals
        failed("flare_internals", "job %s: cannot read FLARE's worker table: %r", job_id, exc)
        return None, False
    status = entry.get(RunProcessKey.STATUS)
    return (status if isinstance(status, int) else None), bool(entry.get(_ABORT_REQUESTED))


def _read_rc_file(run_dir: Path | None) -> int | None:
    """The worker's ``_process_rc.txt``, read before FLARE reads and deletes it."""
    if run_dir is None:
        return None
    try:
        with open(run_dir / FLMetaKey.PROCESS_RC_FILE, "rb") as file:
            return int(file.read(64).decode("utf-8").strip().splitlines()[0])
    except (OSError, ValueError, IndexError):  # absent, as usual, or unreadable
        return None


class ClientProcessJobLauncher(FlareClientProcessJobLauncher):  # type: ignore[misc]
    """Drop-in for FLARE's ``ClientProcessJobLauncher`` that publishes every worker's exit.

    ``args`` (all optional): ``namespace``, ``amqp_url``, ``spool_dir``, ``ca_file``,
    ``retry_seconds``, ``heartbeat`` (else ``EXITPIPE_*``), and ``max_block_seconds``, the
    longest FLARE's thread waits for a delivery.
    """

    def __init__(
        self,
        max_block_seconds: float = 2.0,
        namespace: str | None = None,
        amqp_url: str | None = None,
        spool_dir: str | None = None,
        ca_file: str | None = None,
        retry_seconds: float | None = None,
        heartbeat: int | None = None,
    ) -> None:
        super().__init__()
        self._courier = courier(
            max_block_seconds,
            namespace=namespace,
            amqp_url=amqp_url,
            spool_dir=spool_dir,
            ca_file=ca_file,
            retry_seconds=retry_seconds,
            heartbeat=heartbeat,
        )

    def launch_job(self, job_meta: dict[str, Any], fl_ctx: Any) -> Any:
        """Launch as FLARE does; return the handle wrapped (FLARE's own if wrapping fails)."""
        handle = super().launch_job(job_meta, fl_ctx)
        if self._courier is None:
            return handle
        try:
            return ReportingProcessHandle(
                handle.adapter, _worker_of(job_meta, fl_ctx), self._courier
            )
        except Exception as exc:
            failed(
                "error", "job %s runs unreported: %r", job_meta.get(JobMetaKey.JOB_ID.value), exc
            )
            return handle


def _worker_of(job_meta: Mapping[str, Any], fl_ctx: Any) -> _Worker:
    job_id = str(
        job_meta.get(JobMetaKey.JOB_ID.value) or fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
    )
    engine = fl_ctx.get_engine()
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    run_dir = Path(workspace.get_run_dir(job_id)) if workspace is not None else None
    return _Worker(
        job_id=job_id,
        site=str(engine.get_client_name()),
        executor=getattr(engine, "client_executor", None),
        run_dir=run_dir,
    )


# -- server side -----------------------------------------------------------------------------


def lifecycle_event(job_id: str, status: str, sites: list[str] | None) -> LifecycleEvent:
    """The lifecycle event of a job's status (raises ValidationError outside DESIGN 3)."""
    return LifecycleEvent(
        event_id=uuid.uuid4(),
        job_id=job_id,
        status=status,  # validated by the model: a status outside DESIGN 2a is refused
        sites=sites or None,
        occurred_at=datetime.now(UTC),
    )


class LifecycleReporter(FLComponent):  # type: ignore[misc]
    """Server component: RUNNING with the sites when a job starts, its verdict when it ends.

    FLARE fires ``JOB_STARTED`` at the end of ``_start_run`` (the store still says DISPATCHED
    for a few milliseconds), and ``JOB_COMPLETED`` right after storing the final status
    (preceded by ``JOB_ABORTED`` for FINISHED:ABORTED; ``JOB_ABORTED`` alone for
    FINISHED:FAILED_TO_RUN). The verdict is read back from FLARE's job store and published
    once per job. ``args`` as for ``ClientProcessJobLauncher``.
    """

    def __init__(
        self,
        max_block_seconds: float = 2.0,
        namespace: str | None = None,
        amqp_url: str | None = None,
        spool_dir: str | None = None,
        ca_file: str | None = None,
        retry_seconds: float | None = None,
        heartbeat: int | None = None,
    ) -> None:
        super().__init__()
        self._courier = courier(
            max_block_seconds,
            namespace=namespace,
            amqp_url=amqp_url,
            spool_dir=spool_dir,
            ca_file=ca_file,
            retry_seconds=retry_seconds,
            heartbeat=heartbeat,
        )
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: Any) -> None:
        """FLARE's event hook; never raises."""
        ends = (EventType.JOB_COMPLETED, EventType.JOB_ABORTED)
        if self._courier is None or event_type not in (EventType.JOB_STARTED, *ends):
            return
        try:
            self._report(event_type == EventType.JOB_STARTED, fl_ctx)
        except ValidationError as exc:
            failed("invalid_event", "lifecycle event refused: %s", describe(exc))
        except Exception as exc:
            failed("error", "lifecycle event on %s: %r", event_type, exc)

    def _report(self, started: bool, fl_ctx: Any) -> None:
        job_id = _event_job_id(fl_ctx)
        if job_id is None:
            return
        meta = _job_meta(fl_ctx, job_id)
        status = "RUNNING" if started else str(meta.get(JobMetaKey.STATUS.value) or "")
        if not started and not (status.startswith("FINISHED:") and self._first_end(job_id)):
            return
        event = lifecycle_event(job_id, status, _sites(fl_ctx.get_engine(), job_id, meta))
        assert self._courier is not None
        self._courier.send(event, fl_ctx.get_identity_name(default="server") or "server")

    def _first_end(self, job_id: str) -> bool:
        """True the first time a job's end is seen (FINISHED:ABORTED fires two events)."""
        with self._lock:
            if job_id in self._finished:
                return False
            self._finished[job_id] = None
            while len(self._finished) > REMEMBERED_JOBS:
                self._finished.popitem(last=False)
            return True


def _event_job_id(fl_ctx: Any) -> str | None:
    """The job of a lifecycle event: ``{"job_id": ...}`` in EVENT_DATA (job_runner.py)."""
    data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
    if isinstance(data, dict) and data.get(JobMetaKey.JOB_ID.value):
        return str(data[JobMetaKey.JOB_ID.value])
    job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
    return str(job_id) if job_id else None


def _job_meta(fl_ctx: Any, job_id: str) -> dict[str, Any]:
    """The job's meta as FLARE's job store holds it (empty when FLARE has no job manager)."""
    manager = fl_ctx.get_engine().get_component("job_manager")
    job = manager.get_job(job_id, fl_ctx) if manager is not None else None
    return dict(job.meta) if job is not None else {}


def _sites(engine: Any, job_id: str, meta: Mapping[str, Any]) -> list[str] | None:
    """The job's client sites: those FLARE started it on, else its deploy map's."""
    try:
        entry = engine.run_processes.get(job_id) or {}
        clients = (entry.get(RunProcessKey.PARTICIPANTS) or {}).values()
        names = sorted({str(c.name) for c in clients if getattr(c, "name", None)})
        if names:
            return names
    except Exception as exc:  # a FLARE version without these internals
        failed("flare_internals", "job %s: cannot read FLARE's participants: %r", job_id, exc)
    return _deployed_sites(engine, meta.get(JobMetaKey.DEPLOY_MAP.value) or {})


def _deployed_sites(engine: Any, deploy_map: Mapping[str, Any]) -> list[str] | None:
    """The client sites of a deploy map; ``@ALL`` means every client FLARE knows."""
    names = {name for targets in deploy_map.values() for name in _targets(targets)}
    if "@ALL" in {n.upper() for n in names}:
        names = {str(c.name) for c in engine.get_clients()}
    names.discard("server")
    return sorted(names) or None


def _targets(targets: Any) -> Iterable[str]:
    """Site names from one deploy-map entry: a list of names or of ``{"sites": [...]}``."""
    if isinstance(targets, dict):
        targets = targets.get("sites") or targets.get("targets") or []
    for target in targets if isinstance(targets, list) else []:
        if isinstance(target, dict):
            yield from (str(t) for t in target.get("sites") or target.get("targets") or [])
        else:
            yield str(target)
