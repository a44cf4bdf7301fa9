"""The job-state daemon SIGKILLed before the effect, and after the commit but before the ack."""

from __future__ import annotations

import time

import pytest

from consumers.store.factory import open_store
from tests.faults.conftest import Scenario
from tests.faults.harness import Producer, flat, workload

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("point", ["kill-before-effect", "kill-after-commit"])
def test_job_state_sigkill(scenario: Scenario, point: str) -> None:
    history = scenario.history()
    classifier = scenario.daemon("classifier").start()
    doomed = scenario.daemon("job-state", "job-state-doomed", EXITPIPE_FAULT=f"job-state:{point}")
    try:
        doomed.start()
        producer = Producer(scenario.url, history, flat(workload(400)))
        producer.start()
        assert doomed.wait(60) == -9, doomed.tail()  # the hook fired on its first batch
        healed = time.monotonic()
        job_state = scenario.daemon("job-state").start()
        producer.finish()
        line = scenario.checker(history).run(healed_at=healed)
        assert job_state.stop() == 0, job_state.tail()
    finally:
        assert classifier.stop() == 0, classifier.tail()
    assert line["confirmed"] == line["attempted"]
    if point == "kill-after-commit":
        # The batch committed before the kill came again: only its duplicates counter moved.
        store = open_store(scenario.store_url)
        try:
            views = [store.get(s.job_id) for s in store.list()]
            dups = sum(r.duplicates for v in views if v is not None for r in v.history)
        finally:
            store.close()
        assert dups > 0
