"""10% of the events published twice (the same event id): one effect each."""

from __future__ import annotations

import pytest

from consumers.store.factory import open_store
from tests.faults.conftest import Scenario
from tests.faults.harness import Producer, daemons, flat, workload

pytestmark = pytest.mark.faults


def test_ten_percent_duplicated(scenario: Scenario) -> None:
    history = scenario.history()
    events = flat(workload(500))
    with daemons(scenario.daemon("run")):
        producer = Producer(scenario.url, history, events, duplicate=lambda i: i % 10 == 3)
        producer.run()
        assert producer.error is None, repr(producer.error)
        scenario.checker(history).run()
    store = open_store(scenario.store_url)
    try:
        views = [store.get(s.job_id) for s in store.list()]
        dups = sum(r.duplicates for v in views if v is not None for r in v.history)
    finally:
        store.close()
    # Lifecycle duplicates always reach the store; ignored exits never do.
    assert dups >= sum(1 for i, e in enumerate(events) if i % 10 == 3 and "lifecycle" in e.schema_)
