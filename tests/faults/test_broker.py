"""The broker misbehaves under load: stop_app/start_app, SIGKILL and restart,
close_all_connections. All on the private node, never the shared one."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import Scenario
from tests.faults.harness import Producer, RabbitNode, daemons, flat, wait_for, workload

pytestmark = pytest.mark.faults


def _stop_start(rabbit: RabbitNode, scenario: Scenario) -> None:
    rabbit.ctl("stop_app")
    time.sleep(3)
    rabbit.ctl("start_app")
    rabbit.ctl("await_startup")


def _kill_restart(rabbit: RabbitNode, scenario: Scenario) -> None:
    scenario.settle_before_crash()
    rabbit.kill()
    time.sleep(1)
    rabbit.start()


def _close_all(rabbit: RabbitNode, scenario: Scenario) -> None:
    for _ in range(3):
        rabbit.ctl("close_all_connections", "exitpipe fault suite")
        time.sleep(1.5)


FAULTS: dict[str, Callable[[RabbitNode, Scenario], None]] = {
    "stop_app": _stop_start,
    "kill": _kill_restart,
    "close_all_connections": _close_all,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_broker_fault_under_load(scenario: Scenario, fault: str) -> None:
    history = scenario.history()
    events = flat(workload(600))
    with daemons(scenario.daemon("run")):
        producer = Producer(scenario.url, history, events, pause=0.05)
        producer.start()
        wait_for(lambda: producer.sent >= len(events) // 3, 60, "a third of the load")
        FAULTS[fault](scenario.rabbit, scenario)
        healed = time.monotonic()
        producer.finish(180)
        scenario.checker(history).run(healed_at=healed, timeout=120)
