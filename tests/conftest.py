"""Fixtures shared by every test: real services, one namespace per test.

The broker comes from EXITPIPE_TEST_AMQP_URL, else testcontainers' RabbitMQ when a Docker
engine answers, else the test is skipped with a message saying how to provide one. PostgreSQL
likewise from EXITPIPE_TEST_PG_URL. Under CI=true nothing may be skipped for want of a service.
testcontainers starts RABBITMQ_IMAGE and POSTGRES_IMAGE when set (containers/images.env names
the ones containers/build makes without a registry), else the official images.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest

from producers.broker import delete_topology
from schemas.topology import topology


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def _missing(what: str, variable: str) -> None:
    message = (
        f"no {what}: set {variable} (e.g. EXITPIPE_TEST_AMQP_URL="
        "amqp://guest:guest@127.0.0.1:5672/%2F or EXITPIPE_TEST_PG_URL="
        "postgresql://postgres@127.0.0.1:5432/test) or start a Docker engine"
    )
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI must not skip service tests")
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A real RabbitMQ broker's URL."""
    url = os.environ.get("EXITPIPE_TEST_AMQP_URL")
    if url:
        yield url
        return
    if not _docker_answers():
        _missing("RabbitMQ broker", "EXITPIPE_TEST_AMQP_URL")
    from testcontainers.rabbitmq import RabbitMqContainer

    image = os.environ.get("RABBITMQ_IMAGE") or "rabbitmq:3.10-management"
    with RabbitMqContainer(image) as rabbit:
        params = rabbit.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/%2F"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL server's URL."""
    url = os.environ.get("EXITPIPE_TEST_PG_URL")
    if url:
        yield url
        return
    if not _docker_answers():
        _missing("PostgreSQL server", "EXITPIPE_TEST_PG_URL")
    from testcontainers.postgres import PostgresContainer

    image = os.environ.get("POSTGRES_IMAGE") or "postgres:15"
    with PostgresContainer(image, driver=None) as pg:
        yield pg.get_connection_url()


@pytest.fixture
def namespace(amqp_url: str) -> Iterator[str]:
    """A namespace of this test's own; its exchanges and queues are deleted afterwards."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    yield ns
    delete_namespace(amqp_url, ns)


def delete_namespace(amqp_url: str, ns: str) -> None:
    """Delete every exchange and queue of ``ns`` (missing ones are fine)."""
    delete_topology(amqp_url, topology(ns), retry_seconds=5)


@contextlib.contextmanager
def pg_schema(pg_url: str, prefix: str = "t_") -> Iterator[str]:
    """A store URL whose tables live in a PostgreSQL schema of their own, dropped afterwards."""
    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_store_url(pg_url: str) -> Iterator[str]:
    """A PostgreSQL store URL whose tables live in a schema of this test's own."""
    with pg_schema(pg_url) as url:
        yield url


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test is a failure: CI has every service a test can need."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:5])
        reporter.write_line(f"CI: {len(skipped)} skipped test(s) count as failures: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class RawTimestamp(int):
    """A header value sent as an AMQP timestamp (``T``) of any 64-bit value; pika itself only
    sends datetimes, and cannot read one past year 9999 back."""


@pytest.fixture
def raw_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process publish ``RawTimestamp`` header values."""
    import struct

    import pika.data

    encode = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: object) -> int:
        if isinstance(value, RawTimestamp):
            pieces.append(b"T" + struct.pack(">Q", int(value)))
            return 9
        return int(encode(pieces, value))

    monkeypatch.setattr(pika.data, "encode_value", encode_value)
