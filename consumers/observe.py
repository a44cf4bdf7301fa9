"""Logs, metrics and health for the daemons.

One structured line per decision: text for people, JSON (``--log-format json``) for machines.
Metrics use prometheus-client's default registry; ``/healthz`` answers 503 while any
part of a daemon is not working (a
consumer not consuming, a worker thread gone, the store unreachable).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

EVENTS = Counter(
    "exitpipe_events_total",
    "Events handled, by daemon, decision (classifier) and outcome (job-state).",
    ["daemon", "decision", "outcome"],
)
DEAD_LETTERED = Counter(
    "exitpipe_dead_lettered_total", "Messages sent to the dead-letter queue.", ["daemon"]
)
LATENCY = Histogram(
    "exitpipe_processing_seconds",
    "Time from delivery to settlement (ack, forward confirmed or dead-lettered).",
    ["daemon"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONNECTS = Counter("exitpipe_reconnects_total", "Broker reconnections.", ["daemon"])
CONNECTED = Gauge("exitpipe_broker_connected", "1 while consuming from the broker.", ["daemon"])
LOOP_ERRORS = Counter(
    "exitpipe_loop_errors_total",
    "Exceptions caught in a daemon's I/O loop or worker; each one reconnects or is requeued.",
    ["daemon"],
)
STORE_RETRIES = Counter(
    "exitpipe_store_retries_total", "Store transactions retried after an outage.", ["daemon"]
)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


_FORMAT = {"value": "text"}


class _Pending:
    """Decision lines not yet written to stderr, shared by every ``DecisionLog``.

    stderr is unbuffered underneath (one write system call per line was a tenth of a daemon's
    work at full speed), so lines are gathered here and written together: once ``LINES``
    wait, every ``DecisionLog`` interval, before any other log record (so the order of lines
    on stderr is the order they were made) and at exit.
    """

    LINES = 256

    def __init__(self) -> None:
        # Reentrant: a signal handler that logs can run while this thread is writing lines.
        self._lock = threading.RLock()
        self._lines: list[bytes] = []
        self._flusher: threading.Thread | None = None

    def add(self, data: bytes) -> None:
        with self._lock:
            self._lines.append(data)
            if len(self._lines) >= self.LINES:
                self.flush()

    def flush_every(self, interval: float) -> None:
        """Write waiting lines every ``interval`` seconds from a background thread (one per
        process, however many ``DecisionLog``s there are)."""
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_forever, args=(interval,), daemon=True
                )
                self._flusher.start()

    def _flush_forever(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._lines:
                lines, self._lines = self._lines, []
                _write(b"".join(lines))


def _write(data: bytes) -> None:
    out = getattr(sys.stderr, "buffer", None)
    with contextlib.suppress(Exception):  # a closed or full stderr must not stop a daemon
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode())
            sys.stderr.flush()


PENDING = _Pending()
atexit.register(PENDING.flush)


class _AfterDecisions(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes the decision lines made before its record first."""

    def emit(self, record: logging.LogRecord) -> None:
        PENDING.flush()
        super().emit(record)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send log lines to stderr, as text or JSON."""
    _FORMAT["value"] = fmt
    handler = _AfterDecisions(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.WARNING)


def serve_http(port: int, problems: Callable[[], list[str]]) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` on ``port`` from a daemon thread.

    ``problems`` lists what is not working; ``/healthz`` answers 200 only when it is empty.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                found = problems()
                text = "".join(f"{p}\n" for p in found) or "ok\n"
                self._reply(503 if found else 200, text.encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


class DecisionLog:
    """One line per decision, without the logging module's per-record cost.

    The hot path of a daemon decides thousands of events a second; building a LogRecord,
    walking the stack for the caller and writing stderr per line cost more than the decision
    itself. Lines wait in ``PENDING`` and a background thread writes them every ``interval``
    seconds, or sooner when many wait or another log record comes.
    """

    def __init__(self, name: str, interval: float = 0.1) -> None:
        self.name = name
        self.enabled = logging.getLogger(name).isEnabledFor(logging.INFO)
        self._json = _FORMAT["value"] == "json"
        self._second = -1
        self._prefix = ""
        if self.enabled:
            PENDING.flush_every(interval)

    def emit(self, msg: str, fields: dict[str, Any]) -> None:
        """Write one decision line: ``msg k=v ...`` as text, or a JSON object."""
        if not self.enabled:
            return
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        ts = f"{self._prefix}.{int(now % 1 * 1000):03d}Z"
        if self._json:
            line = json.dumps(
                {"ts": ts, "level": "info", "logger": self.name, "msg": msg, **fields}, default=str
            )
        else:
            pairs = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{ts} INFO {self.name} {msg} {pairs}"
        PENDING.add((line + "\n").encode())
