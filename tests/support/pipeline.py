"""Helpers for tests that run the real daemons against the real broker."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import pika
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from consumers.policy import load_policy
from consumers.store.factory import open_store
from exitpipe.runtime import Pipeline
from exitpipe.settings import Settings
from schemas.codes import Code, JobStatus, Launcher
from schemas.events import ExitEvent, LifecycleEvent

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


def exit_event(
    job: str, site: str, code: Code | None, rc: int | None = None, **kw: Any
) -> ExitEvent:
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id=job,
        site=site,
        code=code,
        return_code=rc,
        occurred_at=now(),
        launcher=kw.pop("launcher", Launcher.PROCESS),
        **kw,
    )


def lifecycle(job: str, status: JobStatus, sites: list[str] | None = None) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=uuid.uuid4(), job_id=job, status=status, sites=sites, occurred_at=now()
    )


def settings_for(amqp_url: str, namespace: str, store: str, **kw: Any) -> Settings:
    return Settings(amqp_url=amqp_url, namespace=namespace, store=store, heartbeat=5, **kw)


@contextmanager
def running(
    settings: Settings, *, classifier: bool = True, job_state: bool = True
) -> Iterator[Pipeline]:
    """The daemons in this process, stopped cleanly at the end of the block."""
    pipeline = Pipeline(
        settings,
        policy=load_policy(settings.policy) if classifier else None,
        store=open_store(settings.store) if job_state else None,
    )
    pipeline.start()
    waiter = threading.Thread(target=pipeline.wait, daemon=True)
    waiter.start()
    try:
        wait_until(lambda: pipeline.healthy, timeout=15)
        yield pipeline
    finally:
        pipeline.stop()
        waiter.join(30)


def wait_until(check: Callable[[], T], timeout: float = 15) -> T:
    """Poll ``check`` until it returns something truthy (tenacity, never a bare sleep)."""

    class NotYet(Exception):
        pass

    for attempt in Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.1),
        retry=retry_if_exception_type(NotYet),
        reraise=True,
    ):
        with attempt:
            value = check()
            if not value:
                raise NotYet(f"condition still false after {timeout}s: {check}")
            return value
    raise AssertionError("unreachable")


def publish_raw(amqp_url: str, exchange: str, key: str, body: bytes, **props: Any) -> None:
    """Publish bytes as they are (for bad input), with a confirm."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(
            exchange, key, body, pika.BasicProperties(delivery_mode=2, **props), mandatory=True
        )
    finally:
        conn.close()


def drain(amqp_url: str, queue: str) -> list[tuple[Any, bytes]]:
    """Take every message from ``queue`` (properties, body)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


def count(amqp_url: str, queue: str) -> int:
    """Messages ready in ``queue``."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def send(amqp_url: str, namespace: str, events: list[Any]) -> None:
    """Publish events as a launcher and the server would, through the real producer code."""
    from producers.publisher import Publisher, publish_events
    from schemas.topology import Names

    with Publisher(amqp_url, retry_seconds=10) as publisher:
        publish_events(publisher, Names(namespace), events)
