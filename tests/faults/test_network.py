"""The network between the daemons and the broker: connections reset, bytes blackholed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.faults.conftest import Scenario
from tests.faults.harness import (
    HEARTBEAT,
    Producer,
    SilentProxy,
    daemons,
    flat,
    wait_for,
    workload,
)
from tests.support.proxy import Proxy

pytestmark = pytest.mark.faults
DEAD_LINK = "nothing from the broker for"


@pytest.fixture
def proxy(scenario: Scenario) -> Iterator[Proxy]:
    with SilentProxy("127.0.0.1", scenario.rabbit.port) as p:
        yield p


def test_proxy_reset(scenario: Scenario, proxy: Proxy) -> None:
    history = scenario.history()
    events = flat(workload(500))
    through = proxy.url(scenario.url)
    with daemons(scenario.daemon("run", amqp_url=through)):
        producer = Producer(through, history, events, pause=0.05)
        producer.start()
        for _ in range(3):
            wait_for(lambda: proxy.connections >= 2, 30, "the daemons and producer connected")
            time.sleep(1.0)
            proxy.reset()
        healed = time.monotonic()
        producer.finish(180)
        scenario.checker(history).run(healed_at=healed)
    assert not proxy.errors


def test_proxy_blackhole(scenario: Scenario, proxy: Proxy) -> None:
    """A silent link is noticed within 3 heartbeats; the daemons reconnect once it passes."""
    history = scenario.history()
    events = flat(workload(500))
    daemon = scenario.daemon("run", amqp_url=proxy.url(scenario.url))
    with daemons(daemon):
        wait_for(lambda: proxy.connections >= 2, 30, "both consumers connected")
        producer = Producer(scenario.url, history, events, pause=0.05)
        producer.start()
        wait_for(lambda: producer.sent >= len(events) // 4, 60, "a quarter of the load")
        before = daemon.log.read_text().count(DEAD_LINK)
        proxy.blackhole()
        start = time.monotonic()
        wait_for(
            lambda: daemon.log.read_text().count(DEAD_LINK) >= before + 2,
            6 * HEARTBEAT,
            "both consumers to declare the link dead",
        )
        noticed = time.monotonic() - start
        assert noticed <= 3 * HEARTBEAT, f"noticed after {noticed:.1f}s"
        time.sleep(HEARTBEAT)
        proxy.passthrough()
        healed = time.monotonic()
        producer.finish(180)
        scenario.checker(history).run(healed_at=healed)
    assert not proxy.errors
