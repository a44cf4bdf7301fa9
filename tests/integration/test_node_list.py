"""A URL list whose first node is down: every kind of connection goes on to the next node.

The cluster suite (``tests/cluster``) kills and cuts off real nodes; this checks, on the one
shared broker, that each adapter takes a list at all: topology, publisher, consumer, dead
letters and the archive reader, with a node that refuses connections listed first.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest

from consumers.amqp import ACK, Action, Consumer, ConsumerConfig, Delivery
from consumers.archive import Archive
from consumers.dead_letters import DeadLetters
from producers.broker import check_topology, declare_topology
from producers.publisher import Outcome, Publisher, outgoing
from schemas.codes import Code
from schemas.events import ExitEvent
from schemas.topology import Names, topology
from tests.faults.harness import free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def urls(amqp_url: str) -> str:
    """A node that refuses connections, then the real broker."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F,{amqp_url}"


def test_every_adapter_skips_a_dead_first_node(urls: str, namespace: str) -> None:
    names = Names(namespace)
    topo = topology(namespace)
    declare_topology(urls, topo, retry_seconds=10)
    assert check_topology(urls, topo, retry_seconds=10) == []

    event = ExitEvent(
        event_id=uuid.uuid4(), job_id="j-1", site="site-1", code=Code.EXCEPTION,
        return_code=101, occurred_at=datetime.now(UTC),
    )  # fmt: skip
    with Publisher(urls, retry_seconds=10, connect_timeout=2) as publisher:
        assert publisher.publish([outgoing(names, event)]) == [Outcome.CONFIRMED]

    got: list[str] = []

    class Collect:
        def handle(self, delivery: Delivery) -> Action | None:
            got.append(str(delivery.properties.message_id))
            return ACK

    consumer = Consumer(ConsumerConfig(urls, names.classify, names.dead, name="t"), Collect())
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: got, 30, "the consumer, through the second node")
    finally:
        consumer.stop()
        thread.join(30)
    assert got == [str(event.event_id)]

    assert DeadLetters(urls, names, retry_seconds=10).count() == 0
    archived = list(Archive(urls, names.archive, retry_seconds=10).read())
    assert [m.routing_key for m in archived] == ["exit.site-1"]
