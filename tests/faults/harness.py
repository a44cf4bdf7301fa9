"""The fault-injection harness: a private broker node, daemons as subprocesses, a history of
what producers were told, and a checker that compares it with the store and the dead letters.

Jepsen's method, small: every publish is recorded as ``ok`` (confirmed), ``fail`` (nacked or
returned) or ``indeterminate`` (the connection died first); a fault is injected while the
load runs; then the checker drains and counts (the store's rows and the dead-letter queue,
never queue counters) and prints one JSON line per scenario. Lost events, duplicate effects
and wrong final states must all be zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest

from consumers.policy import decide, load_policy, to_transition
from consumers.state import Outcome as RowOutcome
from consumers.store.factory import open_store
from consumers.store.memory import MemoryStore
from producers.errors import BrokerError
from producers.publisher import Outcome, Outgoing, Publisher, outgoing
from schemas.codes import Action, Code, JobStatus, Launcher
from schemas.events import Event, ExitEvent, LifecycleEvent
from schemas.topology import Names
from tests.support.pipeline import now
from tests.support.proxy import Mode, Proxy

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def need_rabbit_server(suite: str) -> None:
    """Skip ``suite`` without the RabbitMQ binary to start private nodes from; fail under CI,
    which must run every suite."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        message = f"no RabbitMQ server binary at {RABBIT_BIN}: the {suite} suite needs one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


HEARTBEAT = 2  # seconds: a blackhole must be noticed within 3 of them
POLICY = load_policy("nvflare-2.8")
# rabbitmqctl's own Erlang distribution listens on 35672-35682: never give those to a node.
_CLI_PORTS = range(35600, 35800)


def free_port() -> int:
    """A TCP port nobody listens on now (outside the CLI tools' distribution range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _CLI_PORTS and port + 1 not in _CLI_PORTS:
            return port


def results_path() -> Path:
    """Where each scenario's JSON line is appended (``EXITPIPE_FAULTS_RESULTS``)."""
    default = Path(tempfile.gettempdir()) / "exitpipe-faults-results.jsonl"
    return Path(os.environ.get("EXITPIPE_FAULTS_RESULTS") or default)


# -- the private broker node ------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of our own (same Debian binary), so it can be stopped, killed, alarmed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"exitpipe-faults-{os.getpid()}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.process: subprocess.Popen[bytes] | None = None
        home = base / "home"
        for d in (home, base / "mnesia", base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not the shared node's NODENAME
        (base / "rabbitmq.conf").write_text("log.console = false\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(home),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def launch(self) -> None:
        """Start the node's process group (we own it), without waiting for it."""
        out = (self.base / "server.out").open("ab")
        self.process = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self.env,
            cwd=self.base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout: float = 90) -> None:
        """Start the node and wait until it serves AMQP."""
        self.launch()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"private RabbitMQ exited: see {self.base / 'server.out'}")
            if self.ctl("await_startup", "--timeout", "10", check=False).returncode == 0:
                self._wait_amqp(deadline)
                return
            time.sleep(1)
        raise TimeoutError(f"private RabbitMQ did not start in {timeout}s")

    def _wait_amqp(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.2)

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <our node> ...`` with our cookie."""
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done

    def kill(self) -> None:
        """SIGKILL the whole node (beam and its helpers): a hard crash."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def shutdown(self) -> None:
        """Stop the node for good (politely, then by force)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.ctl("shutdown", check=False, timeout=60)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    @contextlib.contextmanager
    def memory_alarm(self) -> Iterator[None]:
        """Raise the memory alarm (publishers get blocked); always restored."""
        try:
            self.ctl("set_vm_memory_high_watermark", "0.0000001")
            yield
        finally:
            self.ctl("set_vm_memory_high_watermark", "0.4")


# -- daemons as subprocesses ------------------------------------------------------------------


def daemon_env(amqp_url: str, namespace: str, store: str, **extra: str) -> dict[str, str]:
    """The environment of a daemon or CLI call (no stray EXITPIPE_* from the caller)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    env.update(
        EXITPIPE_AMQP_URL=amqp_url,
        EXITPIPE_NAMESPACE=namespace,
        EXITPIPE_STORE=store,
        EXITPIPE_HEARTBEAT=str(HEARTBEAT),
        EXITPIPE_PREFETCH="200",
    )
    env.update(extra)
    return env


class Daemon:
    """``python -m exitpipe.cli <command>`` in the background, its stderr in a log file."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "exitpipe.cli", self.command],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM and wait: a clean stop exits 0."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"{self.command} ignored SIGTERM: {self.tail()}") from None

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def daemons(*items: Daemon) -> Iterator[tuple[Daemon, ...]]:
    """Start daemons; at the end stop them and insist on exit status 0 for the live ones."""
    for d in items:
        d.start()
    try:
        yield items
    finally:
        bad = []
        for d in items:
            if d.alive():
                rc = d.stop()
                if rc != 0:
                    bad.append(f"{d.command} exited {rc}: {d.tail()}")
        assert not bad, bad


# -- the workload and the history --------------------------------------------------------------

_CODES = [
    (Code.EXCEPTION, 101),
    (Code.ABORTED, 9),
    (Code.EXECUTION_ERROR, 1),
    (Code.SUCCESS, 0),
    (Code.CONFIG_ERROR, 103),
    (Code.UNSAFE_COMPONENT, 102),
]


def lifecycle(job: str, status: JobStatus, sites: list[str] | None = None) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=uuid.uuid4(), job_id=job, status=status, sites=sites, occurred_at=now()
    )


def exit_event(job: str, site: str, code: Code, rc: int) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=rc,
        launcher=Launcher.PROCESS,
        occurred_at=now(),
    )


def workload(jobs: int, prefix: str = "job") -> list[list[Event]]:
    """Per job, its events in natural order; each job has at most one terminal cause, so its
    final status does not depend on the order the store sees them in (DESIGN 5)."""
    out = []
    for i in range(jobs):
        job, site = f"{prefix}-{i}", f"site-{i % 3}"
        code, rc = _CODES[i % len(_CODES)]
        events: list[Event] = [
            lifecycle(job, JobStatus.SUBMITTED),
            lifecycle(job, JobStatus.RUNNING, [site, "site-x"]),
            exit_event(job, site, code, rc),
        ]
        if decide(events[2], POLICY).action is Action.IGNORE and i % 2:  # type: ignore[arg-type]
            events.append(lifecycle(job, JobStatus.FINISHED_COMPLETED))
        out.append(events)
    return out


def flat(jobs: Sequence[Sequence[Event]]) -> list[Event]:
    return [e for events in jobs for e in events]


@dataclass
class Record:
    """One attempted publish and what the producer was told."""

    event: Event | None  # None: raw bytes (bad input)
    message_id: str
    outcome: str  # ok | fail | indeterminate
    expect_dead: bool = False


_WORD = {
    Outcome.CONFIRMED: "ok",
    Outcome.NACKED: "fail",
    Outcome.RETURNED: "fail",
    Outcome.INDETERMINATE: "indeterminate",
}


@dataclass
class History:
    """Everything producers attempted, in order, with the outcome each was told."""

    names: Names
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(
        self, publisher: Publisher, events: Sequence[Event], *, twice: bool = False
    ) -> list[str]:
        """Publish through the real Publisher; record each message's outcome."""
        messages = [outgoing(self.names, e) for e in events]
        outcomes = publish_outcomes(publisher, messages)
        words = [_WORD[o] for o in outcomes]
        with self.lock:
            for event, word in zip(events, words, strict=True):
                self.add(event, str(event.event_id), word)
        return words

    def add(
        self, event: Event | None, message_id: str, word: str, expect_dead: bool = False
    ) -> None:
        """Record one attempt; a repeated id keeps its best outcome (ok > indeterminate > fail)."""
        for r in self.records:
            if r.message_id == message_id:
                rank = {"fail": 0, "indeterminate": 1, "ok": 2}
                if rank[word] > rank[r.outcome]:
                    r.outcome = word
                return
        self.records.append(Record(event, message_id, word, expect_dead))

    def count(self, word: str) -> int:
        return sum(1 for r in self.records if r.outcome == word)


def publish_outcomes(publisher: Publisher, messages: Sequence[Outgoing]) -> list[Outcome]:
    """One outcome per message, whatever the publisher raised (its errors carry outcomes)."""
    try:
        return publisher.publish(messages)
    except BrokerError as exc:
        got: list[Outcome] = list(getattr(exc, "outcomes", []))
        return got + [Outcome.INDETERMINATE] * (len(messages) - len(got))


class Producer(threading.Thread):
    """Publishes chunks of the workload in the background, recording every outcome."""

    def __init__(
        self,
        url: str,
        history: History,
        events: Sequence[Event],
        *,
        chunk: int = 50,
        pause: float = 0.02,
        retry_seconds: float = 4.0,
        duplicate: Callable[[int], bool] = lambda i: False,
    ) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.history, self.events = url, history, list(events)
        self.chunk, self.pause, self.retry_seconds = chunk, pause, retry_seconds
        self.duplicate = duplicate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Publisher(
                self.url, heartbeat=HEARTBEAT, retry_seconds=self.retry_seconds, connect_timeout=2
            ) as publisher:
                for start in range(0, len(self.events), self.chunk):
                    part = self.events[start : start + self.chunk]
                    again = [e for i, e in enumerate(part, start) if self.duplicate(i)]
                    self.history.publish(publisher, part + again)
                    self.sent += len(part)
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the producer did not finish"
        assert self.error is None, repr(self.error)


# -- reading the store and the dead letters ----------------------------------------------------


def stored_ids(store_url: str) -> set[str]:
    """Every event id with a history row (cheap, for polling)."""
    try:
        if store_url.startswith("sqlite:///"):
            path = store_url.removeprefix("sqlite:///")
            if not Path(path).exists():
                return set()
            with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
                return {r[0] for r in db.execute("SELECT event_id FROM history")}
        with psycopg.connect(store_url, connect_timeout=5) as conn:
            return {str(r[0]) for r in conn.execute("SELECT event_id FROM history")}
    except (sqlite3.Error, psycopg.Error):
        return set()


@dataclass
class DeadLetter:
    message_id: str | None
    error: str | None
    source: str | None
    x_death: Any
    body: bytes


def drain_dead(amqp_url: str, names: Names, *, take: bool = True) -> list[DeadLetter]:
    """Every message of the dead-letter queue, taken (or, ``take=False``, left in the queue)."""
    out = []
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        while True:
            # Unacked gets go back to the queue when the connection closes.
            method, props, body = ch.basic_get(names.dead_letters, auto_ack=take)
            if method is None:
                return out
            headers = props.headers or {}
            out.append(
                DeadLetter(
                    props.message_id,
                    _text(headers.get("x-exitpipe-error")),
                    _text(headers.get("x-exitpipe-source")),
                    headers.get("x-death"),
                    body,
                )
            )
    finally:
        conn.close()


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# -- the checker --------------------------------------------------------------------------------


def row_event(event: Event | None) -> Event | None:
    """The event the job-state consumer receives for ``event`` (None: no row expected)."""
    if isinstance(event, ExitEvent):
        decision = decide(event, POLICY)
        return None if decision.action is Action.IGNORE else to_transition(event, decision)
    return event


@dataclass
class Checker:
    """Waits for the pipeline to settle, then compares the history with store and dead letters."""

    scenario: str
    history: History
    store_url: str
    amqp_url: str
    dead: list[DeadLetter] = field(default_factory=list)

    def run(self, *, healed_at: float | None = None, timeout: float = 90) -> dict[str, Any]:
        """Check, print and record the JSON line, assert the three zeros; return the line."""
        recover_s = self._converge(healed_at, timeout)
        line = self._count(recover_s)
        text = json.dumps(line, sort_keys=False)
        print(text)
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
        assert line["lost"] == 0, self.details
        assert line["duplicate_effects"] == 0, self.details
        assert line["wrong_final_states"] == 0, self.details
        return line

    def _expected_ids(self) -> tuple[set[str], set[str]]:
        """Ids that must end up in the store, and ids that must end up dead-lettered."""
        rows, dead = set(), set()
        for r in self.history.records:
            if r.outcome != "ok":
                continue
            if r.expect_dead:
                dead.add(r.message_id)
            elif row_event(r.event) is not None:
                rows.add(r.message_id)
        return rows, dead

    def _converge(self, healed_at: float | None, timeout: float) -> float | None:
        rows, dead = self._expected_ids()
        deadline = time.monotonic() + timeout
        recovered: float | None = None
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            self.dead += drain_dead(self.amqp_url, self.history.names)
            got = stored_ids(self.store_url)
            dead_ids = {d.message_id for d in self.dead}
            if recovered is None and rows <= got | dead_ids and dead <= dead_ids:
                recovered = time.monotonic()
            size = len(got) + len(self.dead)
            if size != last:
                last, stable_since = size, time.monotonic()
            # Settled: everything confirmed is in, and nothing more arrived for 3 s (the
            # indeterminate ones that did reach the broker come in meanwhile).
            if recovered is not None and time.monotonic() - stable_since > 3:
                break
            time.sleep(0.5)
        if recovered is None or healed_at is None:
            return None
        return round(max(0.0, recovered - healed_at), 2)

    def _count(self, recover_s: float | None) -> dict[str, Any]:
        store = open_store(self.store_url)
        try:
            views = [store.get(s.job_id) for s in store.list()]
        finally:
            store.close()
        jobs = {v.job_id: v for v in views if v is not None}
        rows = [row for v in jobs.values() for row in v.history]
        ids = Counter(row.event_id for row in rows)
        dead_ids = {d.message_id for d in self.dead}
        by_id = {r.message_id: r for r in self.history.records}
        expected_rows, expected_dead = self._expected_ids()
        self.details: dict[str, Any] = {}

        lost = sorted((expected_rows - set(ids) - dead_ids) | (expected_dead - dead_ids))
        twice = [i for i, n in ids.items() if n > 1]
        moved = [j for j, v in jobs.items() if not _terminal_kept(v.history)]
        bad_dead = [d for d in self.dead if d.message_id in ids and by_id.get(d.message_id or "")]
        unknown = [i for i in ids if i not in by_id]
        poisoned_rows = [i for i in ids if by_id.get(i) and by_id[i].expect_dead]
        wrong = self._wrong_final_states(jobs, set(ids))
        self.details = {
            "lost": lost[:10],
            "applied_twice": twice[:10],
            "terminal_moved": moved[:10],
            "dead_and_applied": [d.message_id for d in bad_dead][:10],
            "unknown_rows": unknown[:10],
            "bad_input_applied": poisoned_rows[:10],
            "wrong_final_states": wrong[:10],
        }
        confirmed_ignored = sum(
            1
            for r in self.history.records
            if r.outcome == "ok" and isinstance(r.event, ExitEvent) and row_event(r.event) is None
        )
        return {
            "scenario": self.scenario,
            "attempted": len(self.history.records),
            "confirmed": self.history.count("ok"),
            "indeterminate": self.history.count("indeterminate"),
            "applied": sum(1 for row in rows if row.outcome is RowOutcome.APPLIED),
            "ignored": sum(1 for row in rows if row.outcome is not RowOutcome.APPLIED)
            + confirmed_ignored,
            "dead_lettered": len(self.dead),
            "lost": len(lost),
            "duplicate_effects": len(twice) + len(moved) + len(unknown) + len(poisoned_rows),
            "wrong_final_states": len(wrong),
            "recover_s": recover_s,
        }

    def _wrong_final_states(self, jobs: dict[str, Any], arrived: set[str]) -> list[str]:
        """Jobs whose status differs from the pure code's, over the events that arrived."""
        model = MemoryStore()
        events = [
            row_event(r.event)
            for r in self.history.records
            if r.message_id in arrived and r.event is not None
        ]
        model.apply_batch([e for e in events if e is not None])  # type: ignore[misc]
        expected = {s.job_id: s.status for s in model.list()}
        return sorted(
            j
            for j in set(expected) | set(jobs)
            if expected.get(j) != (jobs[j].status if j in jobs else None)
        )


def _terminal_kept(history: Sequence[Any]) -> bool:
    """Once a job's status is terminal, no later row changes it; at most one terminal effect."""
    terminal = None
    effects = 0
    for row in history:
        if terminal is not None and (row.status_before, row.status_after) != (terminal, terminal):
            return False
        if row.outcome is RowOutcome.APPLIED and row.status_after and row.status_after.terminal:
            effects += 1
            terminal = row.status_after
    return effects <= 1


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``check()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class SilentProxy(Proxy):
    """A proxy whose blackhole is a real partition: while it holds, one side closing (the
    broker giving up on heartbeats, say) is not passed on to the other side, which only
    hears silence, as it would across a cut network."""

    def _close_pair(self, sock: socket.socket, rst: bool) -> None:
        pair = self._pairs[sock]
        if self.mode is not Mode.BLACKHOLE or len(pair.peer) < 2:
            super()._close_pair(sock, rst)
            return
        del pair.peer[sock]  # the survivor keeps reading into a buffer nobody drains
        self._pairs.pop(sock, None)
        if self._interest.pop(sock, 0):
            self._selector.unregister(sock)
        sock.close()
