"""The store goes away under load: SQLite locked, PostgreSQL cut. Retried in process, so the
delivery limit is not burned and nothing is dead-lettered."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.faults.conftest import Scenario
from tests.faults.harness import Producer, daemons, flat, stored_ids, wait_for, workload
from tests.support.proxy import Proxy

pytestmark = pytest.mark.faults
RETRIED = "store unavailable"


def test_sqlite_locked(scenario: Scenario) -> None:
    history = scenario.history()
    events = flat(workload(500))
    daemon = scenario.daemon("run")
    with daemons(daemon):
        producer = Producer(scenario.url, history, events, pause=0.05)
        producer.start()
        wait_for(lambda: producer.sent >= len(events) // 4, 60, "a quarter of the load")
        # The outage must hit a daemon that is applying, not one still starting up.
        wait_for(lambda: stored_ids(scenario.store_url), 60, "the daemon applying events")
        path = scenario.store_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(7)  # longer than the store's 5 s busy timeout: the retry must run
            db.execute("ROLLBACK")
        healed = time.monotonic()
        producer.finish()
        line = scenario.checker(history).run(healed_at=healed)
    assert line["dead_lettered"] == 0
    assert RETRIED in daemon.log.read_text()


def _through(url: str, proxy: Proxy) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}"))


def test_postgres_cut(scenario: Scenario, pg_store_url: str) -> None:
    history = scenario.history()
    events = flat(workload(500))
    target = urlsplit(pg_store_url)
    with Proxy(target.hostname or "127.0.0.1", target.port or 5432) as proxy:
        store = _through(pg_store_url, proxy)
        daemon = scenario.daemon("run", store=store)
        with daemons(daemon):
            producer = Producer(scenario.url, history, events, pause=0.05)
            producer.start()
            wait_for(lambda: producer.sent >= len(events) // 4, 60, "a quarter of the load")
            # The outage must hit a daemon that is applying, not one still starting up.
            wait_for(lambda: stored_ids(pg_store_url), 60, "the daemon applying events")
            proxy.refuse()
            proxy.reset()  # what clients see while PostgreSQL restarts
            threading.Event().wait(5)
            proxy.passthrough()
            healed = time.monotonic()
            producer.finish()
            line = scenario.checker(history, pg_store_url).run(healed_at=healed)
    assert line["dead_lettered"] == 0
    assert RETRIED in daemon.log.read_text()
