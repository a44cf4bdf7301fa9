"""Wires the daemons: settings in, running consumers out. Used by the CLI and the demo."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from types import FrameType

from consumers.amqp import Action, Consumer, ConsumerConfig, Delivery, Handler
from consumers.classifier import ClassifierHandler
from consumers.job_state import JobStateHandler
from consumers.observe import CONNECTED, LATENCY, RECONNECTS, serve_http
from consumers.policy import Policy
from consumers.store import Store
from exitpipe.settings import Settings, topology_of
from producers.broker import TopologyMissing, declare_topology
from producers.errors import BrokerUnreachable
from schemas.topology import Names

log = logging.getLogger("exitpipe")
EX_SOFTWARE = 70  # sysexits: an internal failure, never a clean stop


def _observer(daemon: str) -> Callable[[Delivery, Action], None]:
    histogram = LATENCY.labels(daemon)

    def observe(delivery: Delivery, _action: Action) -> None:
        histogram.observe(time.perf_counter() - delivery.received)

    return observe


@dataclass
class Pipeline:
    """The classifier and/or job-state consumers of one namespace, each on its own thread."""

    settings: Settings
    policy: Policy | None = None
    store: Store | None = None
    consumers: dict[str, Consumer] = field(default_factory=dict)
    _threads: list[threading.Thread] = field(default_factory=list)
    _job_state: JobStateHandler | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _http: ThreadingHTTPServer | None = None
    _failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        s, names = self.settings, Names(self.settings.namespace)
        if self.policy is not None:
            classifier = ClassifierHandler(
                self.policy, names, require_site_user=s.require_site_user
            )
            self._add("classifier", names.classify, classifier)
        if self.store is not None:
            self._job_state = JobStateHandler(
                self.store, names, batch_size=s.batch_size, batch_wait=s.batch_wait_ms / 1000
            )
            consumer = self._add("job-state", names.job_state, self._job_state)
            self._job_state.start(consumer.settle)

    def _add(self, name: str, queue: str, handler: Handler) -> Consumer:
        s = self.settings
        config = ConsumerConfig(
            url=s.amqp_url,
            queue=queue,
            dead_exchange=Names(s.namespace).dead,
            prefetch=s.prefetch,
            heartbeat=s.heartbeat,
            name=name,
            ca_file=s.amqp_ca_file,
        )
        consumer = Consumer(
            config,
            handler,
            on_settled=_observer(name),
            on_reconnect=RECONNECTS.labels(name).inc,
        )
        self.consumers[name] = consumer
        return consumer

    @property
    def problems(self) -> list[str]:
        """What is not working right now; empty while every part is (``/healthz``)."""
        found = list(self._failures)
        for name, consumer in self.consumers.items():
            CONNECTED.labels(name).set(1 if consumer.connected else 0)
            if not consumer.connected:
                found.append(f"{name}: not consuming")
        if self._job_state is not None:
            found.extend(self._job_state.problems)
        return found

    @property
    def healthy(self) -> bool:
        """True while every part is working."""
        return not self.problems

    def _supervised(self, name: str, run: Callable[[], None]) -> Callable[[], None]:
        # A consumer thread ends only when asked to. If it ends otherwise, or raises, the
        # daemon must not carry on half alive: it stops, and exits with EX_SOFTWARE.
        def target() -> None:
            try:
                run()
            except BaseException as exc:
                log.critical("%s: consumer thread failed", name, exc_info=True)
                self._fail(f"{name}: consumer thread failed: {exc!r}")
                return
            if not self._stopped.is_set():
                self._fail(f"{name}: consumer thread ended unasked")

        return target

    def _fail(self, problem: str) -> None:
        self._record(problem)
        self.stop()

    def _record(self, problem: str) -> None:
        if problem not in self._failures:
            self._failures.append(problem)

    def start(self) -> None:
        """Declare the topology (retrying while the broker is away) and start consuming."""
        self._declare()
        if self._stopped.is_set():
            return
        # Everything made so far (modules, models, the policy) lives as long as the daemon:
        # move it out of the cyclic collector's sight, so its full passes walk only what the
        # messages make and stop adding tens of milliseconds to the latency tail.
        gc.collect()
        gc.freeze()
        if self.settings.metrics_port is not None:
            self._http = serve_http(self.settings.metrics_port, lambda: self.problems)
        for name, consumer in self.consumers.items():
            target = self._supervised(name, consumer.run)
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _declare(self) -> None:
        delay = 0.5
        while not self._stopped.is_set():
            try:
                declare_topology(
                    self.settings.amqp_url,
                    topology_of(self.settings),
                    ca_file=self.settings.amqp_ca_file,
                )
                return
            except (BrokerUnreachable, TopologyMissing) as exc:
                log.warning("cannot declare topology: %s; retrying in %.1fs", exc, delay)
                self._stopped.wait(delay)
                delay = min(delay * 2, 10.0)

    def stop(self) -> None:
        """Ask every consumer to stop; safe from a signal handler."""
        self._stopped.set()
        for consumer in self.consumers.values():
            consumer.stop()

    def wait(self) -> None:
        """Block until every consumer has stopped, then finish the store's work and close it."""
        while any(t.is_alive() for t in self._threads):
            for t in self._threads:
                t.join(0.2)
            if self._job_state is not None and self._job_state.failure is not None:
                self._fail(f"job-state worker stopped: {self._job_state.failure!r}")
        if self._job_state is not None:
            self._job_state.stop()
            if self._job_state.failure is not None:  # it may fail draining its last batch
                self._record(f"job-state worker stopped: {self._job_state.failure!r}")
        if self.store is not None:
            self.store.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def run_until_signal(self) -> int:
        """Run until SIGTERM or SIGINT: 0 after a clean stop, 70 when a part of it failed."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self.wait()
        for problem in self._failures:
            log.critical("exiting after a failure: %s", problem)
        return self.exit_status

    @property
    def exit_status(self) -> int:
        """0 after a clean stop; EX_SOFTWARE when a part of the daemon failed."""
        return EX_SOFTWARE if self._failures else 0
