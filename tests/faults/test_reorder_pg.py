"""Events of each job published in reverse order, some twice, to two job-state consumers on one
PostgreSQL store: the store's per-job transaction serialises them; final states are right."""

from __future__ import annotations

import random

import pytest

from tests.faults.conftest import Scenario
from tests.faults.harness import Producer, daemons, workload

pytestmark = pytest.mark.faults


def test_reordered_across_two_consumers(scenario: Scenario, pg_store_url: str) -> None:
    history = scenario.history()
    jobs = workload(400)
    rng = random.Random(6)
    events = [e for job in jobs for e in reversed(job)]
    rng.shuffle(events)  # jobs interleaved too, each job's own events in scrambled order
    with daemons(
        scenario.daemon("classifier", store=pg_store_url),
        scenario.daemon("job-state", "job-state-1", store=pg_store_url, EXITPIPE_BATCH_SIZE="20"),
        scenario.daemon("job-state", "job-state-2", store=pg_store_url, EXITPIPE_BATCH_SIZE="20"),
    ):
        producer = Producer(scenario.url, history, events, duplicate=lambda i: i % 10 == 0)
        producer.run()
        assert producer.error is None, repr(producer.error)
        scenario.checker(history, pg_store_url).run()
