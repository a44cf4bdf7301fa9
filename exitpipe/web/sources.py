"""Where the dashboard reads from: the store, the archive, the dead letters, the broker's queue
counts and the daemons' ``/metrics``. Every read is a look: nothing is taken, acked or written.

Each broker read makes one short connection with a short retry budget, so a page with the
broker away answers within seconds and says so, instead of hanging.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from prometheus_client.parser import text_string_to_metric_families

from consumers.dead_letters import DeadLetters, DeadMessage
from consumers.policy import Decision, Policy, decide
from consumers.store import Store
from exitpipe.commands.jobs import archived_exit_events
from exitpipe.settings import Settings
from exitpipe.web.views import rate
from producers.errors import BrokerError, BrokerUnreachable, redact
from producers.publisher import connection_parameters, describe
from schemas.events import ExitEvent
from schemas.topology import Names

BROKER_SECONDS = 3.0  # retry budget of one broker read made for a page
METRICS_TIMEOUT = 2.0
# Counters shown per daemon, by sample name.
COUNTERS = {
    "exitpipe_events_total": "events",
    "exitpipe_dead_lettered_total": "dead-lettered",
    "exitpipe_reconnects_total": "reconnects",
    "exitpipe_store_retries_total": "store retries",
}


@dataclass(frozen=True)
class QueueStat:
    """A queue's ready messages and consumers, as the broker counts them."""

    name: str
    messages: int | None  # None: the queue does not exist
    consumers: int | None


@dataclass(frozen=True)
class DaemonHealth:
    """What one daemon's ``/metrics`` says: totals, rates since the last look, connection."""

    url: str
    error: str | None = None
    connected: dict[str, bool] = field(default_factory=dict)  # daemon label -> connected
    totals: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Sources:
    """Everything a page reads, as functions, so the app can be served over fakes in tests."""

    store: Store
    policy: Policy
    exits: Callable[[str], list[ExitEvent]]  # raises BrokerError
    dead: Callable[[], list[DeadMessage]]  # raises BrokerError
    queues: Callable[[], list[QueueStat]]  # raises BrokerError
    metrics: Callable[[], list[DaemonHealth]]

    def decided_exits(self, job_id: str) -> list[tuple[ExitEvent, Decision]]:
        """The job's archived exits, each with what the configured policy decides of it."""
        return [(event, decide(event, self.policy)) for event in self.exits(job_id)]


def sources_from(settings: Settings, store: Store, policy: Policy) -> Sources:
    """The real sources for ``settings``: the broker, the archive and the metrics URLs."""
    quick = settings.model_copy(
        update={"retry_seconds": min(settings.retry_seconds, BROKER_SECONDS)}
    )
    names = Names(settings.namespace)
    dead = DeadLetters(
        settings.amqp_url,
        names,
        retry_seconds=quick.retry_seconds,
        ca_file=settings.amqp_ca_file,
    )
    urls = [u.strip() for u in (settings.web_metrics or "").split(",") if u.strip()]
    return Sources(
        store=store,
        policy=policy,
        exits=lambda job_id: archived_exit_events(quick, job_id),
        dead=dead.browse,
        queues=lambda: queue_stats(settings, names),
        metrics=MetricsReader(urls).read,
    )


def queue_stats(settings: Settings, names: Names) -> list[QueueStat]:
    """Ready messages and consumers of the work queues and the dead-letter queue."""
    params = connection_parameters(
        settings.amqp_url, connect_timeout=BROKER_SECONDS, ca_file=settings.amqp_ca_file
    )
    params.client_properties = {"connection_name": "exitpipe-web"}
    try:
        conn = pika.BlockingConnection(params)
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnreachable(
            f"broker {redact(settings.amqp_url)} unreachable: {describe(exc)}"
        ) from exc
    try:
        return [_declared(conn, q) for q in (names.classify, names.job_state, names.dead_letters)]
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"queue counts: {describe(exc)}") from exc
    finally:
        if conn.is_open:
            conn.close()


def _declared(conn: Any, queue: str) -> QueueStat:
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue, passive=True).method
        return QueueStat(queue, int(ok.message_count), int(ok.consumer_count))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:  # the channel is closed by the broker: nothing to close
            return QueueStat(queue, None, None)
        raise
    finally:
        if channel.is_open:
            channel.close()


class MetricsReader:
    """Reads the daemons' ``/metrics``; a rate compares with the previous read of the same URL."""

    def __init__(self, urls: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = urls
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, dict[str, float]]] = {}

    def read(self) -> list[DaemonHealth]:
        """One ``DaemonHealth`` per configured URL, in the order given."""
        return [self._read(url) for url in self.urls]

    def _read(self, url: str) -> DaemonHealth:
        try:
            with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as reply:
                text = reply.read().decode("utf-8", errors="replace")
        except (OSError, ValueError) as exc:
            return DaemonHealth(redact(url), error=f"unreachable: {exc}")
        totals, connected = parse_metrics(text)
        now = self._clock()
        with self._lock:
            then, before = self._last.get(url, (now, {}))
            self._last[url] = (now, totals)
        rates = {name: rate(before.get(name), value, now - then) for name, value in totals.items()}
        return DaemonHealth(redact(url), None, connected, totals, rates)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, bool]]:
    """The counters of ``COUNTERS`` summed over their labels, and each daemon's connection."""
    totals = dict.fromkeys(COUNTERS.values(), 0.0)
    connected: dict[str, bool] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                totals[COUNTERS[sample.name]] += sample.value
            elif sample.name == "exitpipe_broker_connected":
                connected[sample.labels.get("daemon", "?")] = sample.value >= 1
    return totals, connected
