"""The measurements behind ``python -m benchmarks``; daemons always run as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
from pika.adapters.select_connection import SelectConnection
from pika.spec import BasicProperties

from producers.broker import declare_topology
from producers.publisher import Publisher, outgoing
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import ExitEvent, LifecycleEvent
from schemas.topology import Names, topology


@dataclass
class BenchConfig:
    amqp_url: str
    events: int = 20_000
    rate: float = 2000.0
    paced_seconds: float = 5.0
    prefetch: int = 500
    classifiers: int = 1
    pg_url: str = ""
    warmup: int = 500


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, memory, Python, RabbitMQ, the load before."""
    rabbit = subprocess.run(
        ["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(total_kib / 2**20, 1),
        "python": sys.version.split()[0],
        "rabbitmq": rabbit or None,
        "load_before": os.getloadavg(),
    }


def log(message: str) -> None:
    """Progress, on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95, p99 of ``values`` (seconds)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def _event(run: str, i: int) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=f"{run}-{i}",
        site="site-1",
        code=Code.EXCEPTION,
        return_code=101,
        launcher=Launcher.K8S,
        occurred_at=datetime.now(UTC),
    )


def _peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _broker_pid(url: str) -> int | None:
    """The local RabbitMQ node's process, when ``url`` is on this machine (else None)."""
    if pika.URLParameters(url).host not in ("127.0.0.1", "localhost", "::1"):
        return None
    found = subprocess.run(["pgrep", "-f", "beam.smp.*rabbit"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if len(pids) == 1 else None  # several nodes here: not ours to tell apart


class CpuMeter:
    """CPU used per event by each process of a run: where the time goes at full speed.

    ``pids`` maps a role to a process; ``publisher`` is this process (it publishes, and
    does little else while the run lasts); ``broker`` the local RabbitMQ node, when there is
    exactly one.
    """

    def __init__(self, url: str, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        broker = _broker_pid(url)
        if broker is not None:
            self.pids["broker"] = broker
        self.pids["publisher"] = os.getpid()
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        return {role: _cpu_seconds(pid) for role, pid in self.pids.items()}

    def per_event(self, events: int) -> dict[str, float]:
        """Microseconds of CPU per event for each role since the meter was made."""
        end = self._now()
        return {role: (end[role] - self._start[role]) / events * 1e6 for role in self.pids}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _delete(url: str, queues: list[str], exchanges: list[str]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)
        for e in exchanges:
            ch.exchange_delete(e)
    finally:
        conn.close()


# -- raw publisher (baseline) ---------------------------------------------------------------


def raw_publish(
    url: str,
    queue: str,
    bodies: Callable[[int], bytes],
    count: int,
    rate: float | None,
    window: int = 1000,
    exchange: str = "",
) -> None:
    """Publish ``count`` messages to ``queue`` (or through ``exchange``) with up to ``window``
    confirms in flight."""
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "t0": 0.0}
    inflight: OrderedDict[int, None] = OrderedDict()

    def pump() -> None:
        ch = state["ch"]
        allowed = count if rate is None else int((time.monotonic() - state["t0"]) * rate) + 1
        while state["sent"] < min(count, allowed) and len(inflight) < window:
            state["sent"] += 1
            props = BasicProperties(
                delivery_mode=2, content_type="application/json", headers={"x-t": repr(time.time())}
            )
            ch.basic_publish(exchange, queue, bodies(state["sent"]), props)
            inflight[state["sent"]] = None
        if rate is not None and state["sent"] < count:
            state["conn"].ioloop.call_later(0.002, pump)

    def on_confirm(frame: Any) -> None:
        last = frame.method.delivery_tag
        if frame.method.multiple:
            while inflight and next(iter(inflight)) <= last:
                inflight.popitem(last=False)
                state["confirmed"] += 1
        elif inflight.pop(last, 0) is None:
            state["confirmed"] += 1
        if state["confirmed"] >= count:
            state["conn"].close()
        elif rate is None:
            pump()

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        state["t0"] = time.monotonic()
        ch.confirm_delivery(on_confirm, callback=lambda _f: pump())

    conn = SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, r: c.ioloop.stop(),
    )
    state["conn"] = conn
    conn.ioloop.start()


def _baseline_round(
    config: BenchConfig, count: int, rate: float | None, archive: bool = False
) -> dict[str, Any]:
    """One raw run; with ``archive`` each hop also fans out into a stream, as exitpipe's do."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    q1, q2, stream = f"{ns}.q1", f"{ns}.q2", f"{ns}.archive"
    conn = pika.BlockingConnection(pika.URLParameters(config.amqp_url))
    ch = conn.channel()
    for q in (q1, q2):
        ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    if archive:
        ch.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
        for x, q in ((f"{ns}.x1", q1), (f"{ns}.x2", q2)):
            ch.exchange_declare(x, "fanout", durable=True)
            ch.queue_bind(q, x)
            ch.queue_bind(stream, x)
    conn.close()
    cmd = [sys.executable, "-m", "benchmarks.baseline"]
    target = f"x:{ns}.x2" if archive else q2
    relay = subprocess.Popen([*cmd, "relay", config.amqp_url, q1, target, str(config.prefetch)])
    sink = subprocess.Popen(
        [*cmd, "sink", config.amqp_url, q2, str(count), str(config.prefetch)],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # both consuming
        run = uuid.uuid4().hex[:6]
        meter = CpuMeter(config.amqp_url, {"relay": relay.pid, "sink": sink.pid})
        t0 = time.time()
        raw_publish(
            config.amqp_url,
            q1,
            lambda i: _event(run, i).to_json(),
            count,
            rate,
            exchange=f"{ns}.x1" if archive else "",
        )
        assert sink.stdout is not None
        line = sink.stdout.readline()  # printed once it has every message, before it exits
        cpu = meter.per_event(count)
        rest, _ = sink.communicate(timeout=600)
        result = json.loads(line + rest)
        rss = {"relay": _peak_rss(relay.pid)}
        return {
            "rate": count / (result["last"] - t0),
            **percentiles(result["latencies"]),
            "peak_rss": rss,
            "cpu_us": cpu,
        }
    finally:
        relay.kill()
        sink.kill()
        relay.wait()
        exchanges = [f"{ns}.x1", f"{ns}.x2"] if archive else []
        _delete(config.amqp_url, [q1, q2, stream], exchanges)


def measure_baseline(config: BenchConfig, archive: bool = False) -> dict[str, Any]:
    """Raw pika: the maximum rate, then a paced run."""
    name = "baseline+archive" if archive else "baseline"
    log(f"{name}: {config.events} events at the maximum rate")
    top = _baseline_round(config, config.events, None, archive)
    paced_n = int(config.rate * config.paced_seconds)
    log(f"{name}: {paced_n} events paced at {config.rate:.0f}/s")
    paced = _baseline_round(config, paced_n, config.rate, archive)
    log(f"{name}: {top['rate']:.0f} events/s")
    return {"max": top, "paced": paced, "peak_rss": top.pop("peak_rss")}


# -- exitpipe end to end --------------------------------------------------------------------


class _StoreProbe:
    """Counts and reads history rows straight from the store's tables (bench only)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self._conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
        else:
            import psycopg

            self._conn = psycopg.connect(url, autocommit=True)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        if isinstance(self._conn, sqlite3.Connection):
            return self._conn.execute(sql.replace("%s", "?"), args).fetchall()
        return self._conn.execute(sql, args).fetchall()

    def count(self, prefix: str) -> int:
        try:
            return int(
                self._one("SELECT count(*) FROM history WHERE job_id LIKE %s", (prefix + "%",))[0][
                    0
                ]
            )
        except (sqlite3.OperationalError, Exception):  # tables not created yet
            return 0

    def latencies(self, prefix: str) -> tuple[list[float], float]:
        rows = self._one(
            "SELECT occurred_at, recorded_at FROM history WHERE job_id LIKE %s", (prefix + "%",)
        )
        lat, last = [], 0.0
        for occurred, recorded in rows:
            o, r = _ts(occurred), _ts(recorded)
            lat.append(r - o)
            last = max(last, r)
        return lat, last

    def close(self) -> None:
        self._conn.close()


def _ts(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


@contextmanager
def _daemons(config: BenchConfig, ns: str, store_url: str) -> Iterator[dict[str, int]]:
    env = {
        **os.environ,
        "EXITPIPE_AMQP_URL": config.amqp_url,
        "EXITPIPE_NAMESPACE": ns,
        "EXITPIPE_STORE": store_url,
        "EXITPIPE_PREFETCH": str(config.prefetch),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports = []
    roles = ["job-state"] + [f"classifier-{i}" for i in range(config.classifiers)]
    for role in roles:
        port = _free_port()
        ports.append(port)
        cmd = [
            sys.executable,
            "-m",
            "exitpipe.cli",
            role.split("-")[0] if role.startswith("classifier") else role,
            "--metrics-port",
            str(port),
        ]
        procs[role] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 30
        for port in ports:
            while True:
                try:
                    if (
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status
                        == 200
                    ):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("daemons did not become healthy")
                time.sleep(0.1)
        yield {role: p.pid for role, p in procs.items()}
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _publish_events(
    publisher: Publisher, names: Names, run: str, start: int, count: int, rate: float | None
) -> None:
    """Publish ``count`` events, in chunks; paced at ``rate`` when given."""
    chunk = 1000 if rate is None else max(1, int(rate * 0.005))
    t0 = time.monotonic()
    sent = 0
    while sent < count:
        if rate is not None:
            due = t0 + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        n = min(chunk, count - sent)
        messages = [outgoing(names, _event(run, start + sent + i)) for i in range(n)]
        publisher.publish(messages)
        sent += n


def _wait_rows(probe: _StoreProbe, prefix: str, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while probe.count(prefix) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {probe.count(prefix)} of {count} applied in {timeout}s")
        time.sleep(0.05)


def _store_url(config: BenchConfig, store: str, workdir: Path) -> tuple[str, Callable[[], None]]:
    if store == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", lambda: None
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(config.pg_url, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(config.pg_url, autocommit=True) as c:
            c.execute(f'DROP SCHEMA "{schema}" CASCADE')

    sep = "&" if "?" in config.pg_url else "?"
    return f"{config.pg_url}{sep}options={quote(f'-csearch_path={schema}')}", drop


def measure_exitpipe(config: BenchConfig, store: str) -> dict[str, Any]:
    """exitpipe end to end on ``store``: warm-up, the maximum rate, then a paced run."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    names = Names(ns)
    topo = topology(ns)
    declare_topology(config.amqp_url, topo)
    workdir = Path(tempfile.mkdtemp(prefix="exitpipe-bench-"))
    store_url, drop = _store_url(config, store, workdir)
    result: dict[str, Any] = {}
    try:
        with (
            _daemons(config, ns, store_url) as pids,
            Publisher(config.amqp_url, window=1000) as publisher,
        ):
            probe = _StoreProbe(store_url)
            _publish_events(publisher, names, "warm", 0, config.warmup, None)
            _wait_rows(probe, "warm-", config.warmup)
            log(f"exitpipe-{store}: {config.events} events at the maximum rate")
            run = f"max{uuid.uuid4().hex[:4]}"
            meter = CpuMeter(config.amqp_url, pids)
            t0 = time.time()
            _publish_events(publisher, names, run, 0, config.events, None)
            _wait_rows(probe, f"{run}-", config.events)
            cpu = meter.per_event(config.events)
            lat, last = probe.latencies(f"{run}-")
            result["max"] = {
                "rate": config.events / (last - t0),
                **percentiles(lat),
                "cpu_us": cpu,
            }
            log(f"exitpipe-{store}: {result['max']['rate']:.0f} events/s")
            paced_n = int(config.rate * config.paced_seconds)
            log(f"exitpipe-{store}: {paced_n} events paced at {config.rate:.0f}/s")
            run = f"paced{uuid.uuid4().hex[:4]}"
            _publish_events(publisher, names, run, 0, paced_n, config.rate)
            _wait_rows(probe, f"{run}-", paced_n)
            lat, _ = probe.latencies(f"{run}-")
            result["paced"] = {"rate": config.rate, **percentiles(lat)}
            result["peak_rss"] = {role: _peak_rss(pid) for role, pid in pids.items()}
            probe.close()
    finally:
        drop()
        _delete(config.amqp_url, [q.name for q in topo.queues], [e.name for e in topo.exchanges])
    return result


def measure_memory(config: BenchConfig, small: int, large: int) -> dict[str, Any]:
    """Daemon RSS after ``small`` and after ``large`` events (SQLite store)."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    names, topo = Names(ns), topology(ns)
    declare_topology(config.amqp_url, topo)
    workdir = Path(tempfile.mkdtemp(prefix="exitpipe-bench-"))
    store_url = f"sqlite:///{workdir / 'bench.db'}"
    out: dict[str, Any] = {}
    try:
        with _daemons(config, ns, store_url) as pids, Publisher(config.amqp_url) as publisher:
            probe = _StoreProbe(store_url)
            done = 0
            for mark in (small, large):
                _publish_events(publisher, names, "mem", done, mark - done, None)
                _wait_rows(probe, "mem-", mark)
                done = mark
                out[str(mark)] = {role: _rss(pid) for role, pid in pids.items()}
                log(f"memory after {mark}: {out[str(mark)]}")
            probe.close()
    finally:
        _delete(config.amqp_url, [q.name for q in topo.queues], [e.name for e in topo.exchanges])
    return out


def _job_stories(count: int) -> Iterator[bytes]:
    """A realistic archive: per job SUBMITTED, DISPATCHED, RUNNING, an exit per site (most
    SUCCESS, some teardown EXECUTION_ERROR, one job in ten an EXCEPTION) and FINISHED."""
    sites = ["site-1", "site-2", "site-3"]
    made, job = 0, 0
    while made < count:
        job_id = f"rp-{job}"
        events: list[Any] = [
            LifecycleEvent(
                event_id=uuid.uuid4(),
                job_id=job_id,
                status=s,
                occurred_at=_now(),
                sites=sites if s is JobStatus.SUBMITTED else None,
            )
            for s in (JobStatus.SUBMITTED, JobStatus.DISPATCHED, JobStatus.RUNNING)
        ]
        for n, site in enumerate(sites):
            code = (
                Code.EXCEPTION
                if job % 10 == 0 and n == 0
                else (Code.EXECUTION_ERROR if n == 2 else Code.SUCCESS)
            )
            events.append(
                ExitEvent(
                    event_id=uuid.uuid4(),
                    job_id=job_id,
                    site=site,
                    code=code,
                    return_code=int(code),
                    occurred_at=_now(),
                )
            )
        events.append(
            LifecycleEvent(
                event_id=uuid.uuid4(),
                job_id=job_id,
                status=JobStatus.FINISHED_COMPLETED,
                occurred_at=_now(),
            )
        )
        for event in events[: count - made]:
            yield event.to_json()
        made += len(events)
        job += 1


def _now() -> datetime:
    return datetime.now(UTC)


def measure_replay(count: int) -> dict[str, Any]:
    """``exitpipe replay --file`` of ``count`` events as a whole process, output included.

    What a user waits for: the command from start to exit, its JSON (``--json``) or its text
    written to a file, for each output form; the rate the command reports on stderr (reading
    and replaying only) is kept beside it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="exitpipe-bench-"))
    path = workdir / "events.jsonl"
    with path.open("wb") as f:
        for line in _job_stories(count):
            f.write(line + b"\n")
    out: dict[str, Any] = {"events": count}
    for form, extra in (("json", ["--json"]), ("text", [])):
        log(f"replay --file of {count} events ({form} output)")
        with (workdir / f"out.{form}").open("wb") as sink:
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "exitpipe.cli", "replay", "--file", str(path), *extra],
                stdout=sink,
                stderr=subprocess.PIPE,
                text=True,
                timeout=600,
            )
            wall = time.monotonic() - t0
        match = re.search(r"([\d,]+) events in ([\d.]+) ?s", proc.stderr)
        out[form] = {
            "wall_s": wall,
            "rate": count / wall,
            "replay_s": float(match.group(2)) if match else None,
            "exit": proc.returncode,
        }
    # The figures of earlier runs, kept for their readers: the JSON form.
    out.update(seconds=out["json"]["wall_s"], rate=out["json"]["rate"])
    return out
