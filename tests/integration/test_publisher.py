"""The publish adapter and the spool on a real broker, with the proxy cutting the line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pytest

from producers.broker import declare_topology
from producers.errors import BrokerUnreachable, Unroutable
from producers.publisher import Outcome, Outgoing, Publisher, publish_event
from schemas.codes import Code
from schemas.events import ExitEvent, parse_body
from schemas.topology import Names, Topology, topology
from tests.support.proxy import Proxy

pytestmark = pytest.mark.integration


@pytest.fixture
def names(amqp_url: str, namespace: str) -> Names:
    declare_topology(amqp_url, topology(namespace))
    return Names(namespace)


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[Proxy]:
    parts = urlsplit(amqp_url)
    with Proxy(parts.hostname or "127.0.0.1", parts.port or 5672) as running:
        yield running


def exit_event(job: str = "job-1", site: str = "site-1") -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=Code.EXCEPTION,
        return_code=101,
        occurred_at=datetime.now(UTC),
    )


def messages(names: Names, count: int) -> list[Outgoing]:
    return [Outgoing(names.events, "exit.site-1", b'{"n": %d}' % n, f"m-{n}") for n in range(count)]


def drain(amqp_url: str, queue: str, settle: float = 0.3) -> list[tuple[object, bytes]]:
    """Every message in ``queue`` (properties, body), taken until it stays empty ``settle`` s."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=2000)
    found = []
    for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=settle):
        if method is None:
            break
        found.append((props, body))
    conn.close()
    return found


def archived(amqp_url: str, queue: str, count: int) -> list[tuple[object, bytes]]:
    """The first ``count`` messages of a stream, read from its start."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=100)
    found = []
    stream = channel.consume(queue, arguments={"x-stream-offset": "first"}, inactivity_timeout=5)
    for method, props, body in stream:
        assert method is not None, f"only {len(found)} messages in {queue}"
        channel.basic_ack(method.delivery_tag)
        found.append((props, body))
        if len(found) == count:
            break
    conn.close()
    return found


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_confirmed_event_is_in_the_classify_queue_and_the_archive(
    amqp_url: str, names: Names
) -> None:
    event = exit_event()
    before = int(time.time())
    with Publisher(amqp_url) as publisher:
        publish_event(publisher, names, event)
    ((props, body),) = drain(amqp_url, names.classify)
    assert parse_body(body) == event
    assert props.delivery_mode == 2  # type: ignore[attr-defined]
    assert props.message_id == str(event.event_id)  # type: ignore[attr-defined]
    assert props.content_type == "application/json"  # type: ignore[attr-defined]
    assert before <= props.timestamp <= time.time() + 1  # type: ignore[attr-defined]
    ((props, body),) = archived(amqp_url, names.archive, 1)
    assert parse_body(body) == event


def test_many_messages_in_a_small_window_are_all_confirmed(amqp_url: str, names: Names) -> None:
    batch = messages(names, 5000)
    with Publisher(amqp_url, window=64) as publisher:
        assert publisher.publish(batch) == [Outcome.CONFIRMED] * len(batch)
        assert publisher.publish(batch[:3]) == [Outcome.CONFIRMED] * 3  # the same connection
    ids = [props.message_id for props, _ in drain(amqp_url, names.classify)]  # type: ignore[attr-defined]
    assert ids == [m.message_id for m in batch + batch[:3]]


def test_a_message_with_no_queue_bound_comes_back_loudly(amqp_url: str, namespace: str) -> None:
    names = Names(namespace)
    exchanges_only = Topology(topology(namespace).exchanges, ())
    declare_topology(amqp_url, exchanges_only)
    with Publisher(amqp_url) as publisher:
        with pytest.raises(Unroutable) as caught:
            publish_event(publisher, names, exit_event(site="site-7"))
        message = str(caught.value)
        assert f"'{names.events}'" in message and "'exit.site-7'" in message
        assert "exitpipe topology" in message


def test_a_message_to_a_missing_exchange_is_returned_and_the_rest_go_on(
    amqp_url: str, names: Names
) -> None:
    lost = Outgoing(f"{names.ns}.nowhere", "exit.x", b"{}", "lost")
    batch = [*messages(names, 2), lost, *messages(names, 2)]
    with Publisher(amqp_url) as publisher:
        outcomes = publisher.publish(batch)
    assert outcomes[2] is Outcome.RETURNED
    assert outcomes[:2] + outcomes[3:] == [Outcome.CONFIRMED] * 4


def test_a_nacked_message_is_sent_again_then_reported_nacked(amqp_url: str, names: Names) -> None:
    full = f"{names.ns}.full"  # holds one message and refuses the next ones
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    # A classic queue: a quorum queue applies its length limit a little late and overshoots.
    arguments = {"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"}
    channel.queue_declare(full, durable=True, arguments=arguments)
    channel.queue_bind(full, names.jobs, "full.#")
    try:
        batch = [Outgoing(names.jobs, "full.x", b"{}", f"n-{n}") for n in range(3)]
        with Publisher(amqp_url, nack_retries=2) as publisher:
            outcomes = publisher.publish(batch)
        assert outcomes == [Outcome.CONFIRMED, Outcome.NACKED, Outcome.NACKED]
    finally:
        channel.queue_delete(full)
        conn.close()


def test_report_to_an_undeclared_namespace_spools_the_event_and_names_the_route(
    amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    common = ["--amqp-url", amqp_url, "--namespace", namespace, "--spool-dir", str(tmp_path)]
    done = cli("report", *common, "--job", "j", "--site", "s", "--code", "EXCEPTION")
    assert done.returncode == 75, done.stderr
    assert f"'{namespace}.events'" in done.stderr and "exitpipe topology" in done.stderr
    listing = cli("spool", "list", *common)
    assert done.stdout.strip() in listing.stdout


@pytest.mark.parametrize("cut", ["refuse", "blackhole"])
def test_an_outage_spools_reports_and_flush_delivers_each_exactly_once(
    amqp_url: str, names: Names, proxy: Proxy, tmp_path: Path, cut: str
) -> None:
    common = ["--namespace", names.ns, "--spool-dir", str(tmp_path), "--retry-seconds", "1"]
    through = ["--amqp-url", proxy.url(amqp_url), *common]
    proxy.refuse() if cut == "refuse" else proxy.blackhole()
    proxy.reset()  # and cut what was open
    ids = []
    for job in ("job-a", "job-b"):
        done = cli("report", *through, "--job", job, "--site", "s1", "--code", "ABORTED")
        assert done.returncode == 75, done.stderr
        assert "password" not in done.stderr and "guest:guest" not in done.stderr
        ids.append(done.stdout.strip())
    listing = cli("spool", "list", *common)
    assert [line.split("\t")[-1] for line in listing.stdout.splitlines()] == ids
    still_down = cli("spool", "flush", *through)
    assert still_down.returncode == 75 and len(list(tmp_path.glob("*.json"))) == 2
    proxy.passthrough()
    flushed = cli("spool", "flush", *through)
    assert flushed.returncode == 0, flushed.stderr
    delivered = [props.message_id for props, _ in drain(amqp_url, names.classify)]  # type: ignore[attr-defined]
    assert delivered == ids
    assert cli("spool", "list", *common).stdout == ""


def test_a_dead_connection_is_replaced_on_the_next_publish(
    amqp_url: str, names: Names, proxy: Proxy
) -> None:
    with Publisher(proxy.url(amqp_url), retry_seconds=5) as publisher:
        assert publisher.publish(messages(names, 1)) == [Outcome.CONFIRMED]
        proxy.reset()
        assert publisher.publish(messages(names, 1)) == [Outcome.CONFIRMED]
    assert proxy.accepted == 2


def test_a_connection_cut_mid_batch_resends_the_unconfirmed(
    amqp_url: str, names: Names, proxy: Proxy
) -> None:
    batch = messages(names, 20000)
    cutter = threading.Thread(target=cut_when_stored, args=(amqp_url, names.classify, 2000, proxy))
    with Publisher(proxy.url(amqp_url), retry_seconds=10) as publisher:
        cutter.start()
        outcomes = publisher.publish(batch)
    cutter.join()
    assert outcomes == [Outcome.CONFIRMED] * len(batch)
    assert proxy.accepted >= 2, "the cut came after the batch: nothing was resent"
    ids = [props.message_id for props, _ in drain(amqp_url, names.classify)]  # type: ignore[attr-defined]
    assert set(ids) == {m.message_id for m in batch}  # at least once; duplicates allowed


def cut_when_stored(amqp_url: str, queue: str, count: int, proxy: Proxy) -> None:
    """Reset the proxy's connections once ``queue`` holds ``count`` messages: mid-batch."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    deadline = time.monotonic() + 10
    while channel.queue_declare(queue, passive=True).method.message_count < count:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proxy.reset()
    conn.close()


def test_a_silent_broker_is_given_up_within_the_budget(
    amqp_url: str, names: Names, proxy: Proxy
) -> None:
    with Publisher(proxy.url(amqp_url), retry_seconds=1, connect_timeout=0.5) as publisher:
        assert publisher.publish(messages(names, 1)) == [Outcome.CONFIRMED]
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(BrokerUnreachable) as caught:
            publisher.publish(messages(names, 3))
        assert time.monotonic() - started < 4
    assert caught.value.outcomes == [Outcome.INDETERMINATE] * 3


def test_a_refused_login_fails_at_once_without_the_password(amqp_url: str, names: Names) -> None:
    parts = urlsplit(amqp_url)
    wrong = parts._replace(netloc=f"guest:s3cret-pw@{parts.hostname}:{parts.port or 5672}")
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as caught:
        Publisher(wrong.geturl(), retry_seconds=10).publish(messages(names, 1))
    assert time.monotonic() - started < 2, "a refused login is not weather"
    assert "s3cret-pw" not in str(caught.value) and "guest:***@" in str(caught.value)
