"""End to end: hostile publishers against the daemons under per-role users and PostgreSQL.

On the private node, ``exitpipe topology --users site-a,site-b`` makes the users; the classifier
and job-state run as their own users, job-state on PostgreSQL. Then every kind of spoof and
malformed body that issue 11 reproduced goes in on both exchanges, each under the user that
could really send it, followed by good events. The test asserts that

- nothing hostile took effect (the jobs they aimed at are as the good events left them);
- every hostile message is in ``<ns>.dead-letters`` with ``x-exitpipe-error`` and no
  ``x-death``: dead-lettered at its first delivery, not by the delivery limit;
- a dead letter outlives its original's ``expiration``;
- both daemons are still applying afterwards, and stop with status 0 on SIGTERM;
- ``dead requeue`` (by the administrator) sends each spoof back as its original sender's, so
  every one is refused again, while a legitimate exit that the delivery limit had
  dead-lettered gets through under ``EXITPIPE_REQUIRE_SITE_USER=true``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest
from pika.spec import BasicProperties

from consumers.store.factory import open_store
from schemas.codes import Code, JobStatus
from schemas.events import MAX_BODY_BYTES
from schemas.topology import SENDER_HEADER
from tests.conftest import RawTimestamp
from tests.faults.conftest import SITES, Secured
from tests.faults.harness import (
    Daemon,
    DeadLetter,
    daemons,
    drain_dead,
    exit_event,
    lifecycle,
    wait_for,
)
from tests.strategies import transition

pytestmark = pytest.mark.faults
HUGE = b"9" * 5000


def _publish(url: str, exchange: str, key: str, body: bytes, **props: Any) -> str:
    """Publish as ``url``'s user, with a confirm; the message id."""
    message_id = props.pop("message_id", None) or str(uuid.uuid4())
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        properties = BasicProperties(delivery_mode=2, message_id=message_id, **props)
        channel.basic_publish(exchange, key, body, properties, mandatory=True)
    finally:
        conn.close()
    return message_id


def _exit(job: str, site: str, **fields: Any) -> bytes:
    event = json.loads(exit_event(job, site, Code.EXCEPTION, 101).to_json())
    event.update(fields)
    return json.dumps(event).encode()


def _with_raw(body: bytes, key: str, raw: bytes) -> bytes:
    """``body`` with one more member whose value is written as given (not JSON-encoded)."""
    return body[:-1] + b', "' + key.encode() + b'": ' + raw + b"}"


def _hostile(secured: Secured) -> dict[str, tuple[str, str, bytes, str | None, dict[str, Any]]]:
    """Every hostile message: name -> (role, exchange-key, body, expected reason start, props)."""
    spoof = _exit("h-1", "site-b")
    lifecycle_body = lifecycle("h-1", JobStatus.FINISHED_ABORTED).to_json()
    forged = transition("h-1", "site-a").to_json()
    site_a, server = "site-site-a", "server"
    return {
        # A site reporting as another: under its own key, without and with user_id.
        "spoof-body": (site_a, "exit.site-a", spoof, "routing key: 'exit.site-a'", {}),
        "spoof-user": (site_a, "exit.site-a", spoof, "site: event names 'site-b'", {"user": 1}),
        "spoof-dup-key": (
            site_a,
            "exit.site-a",
            _with_raw(_exit("h-1", "site-a"), "site", b'"site-b"'),
            "body: not JSON (Detected duplicate key",
            {},
        ),
        # Malformed bodies of every kind, on the events exchange ...
        "huge-int": (
            site_a,
            "exit.site-a",
            _with_raw(_exit("h-1", "site-a"), "x", HUGE),
            "body: not JSON (a number too large",
            {},
        ),
        "nan": (
            site_a,
            "exit.site-a",
            _exit("h-1", "site-a").replace(b'"return_code": 101', b'"return_code": NaN'),
            "body: not JSON",
            {},
        ),
        "bom": (site_a, "exit.site-a", b"\xef\xbb\xbf" + _exit("h-1", "site-a"), "body:", {}),
        "deep": (site_a, "exit.site-a", b"[" * 10000 + b"]" * 10000, "body: not JSON (nested", {}),
        "nul": (site_a, "exit.site-a", _exit("h-1", "site-a", reason="a\x00b"), "reason:", {}),
        "not-utf8": (site_a, "exit.site-a", b'{"schema": "\xff"}', "body: not UTF-8", {}),
        "oversize": (
            site_a,
            "exit.site-a",
            _exit("h-1", "site-a", reason="x" * MAX_BODY_BYTES),
            "body:",
            {},
        ),
        "unknown-schema": (
            site_a,
            "exit.site-a",
            _exit("h-1", "site-a", schema="exitpipe.exit/9"),
            "schema:",
            {},
        ),
        "ttl": (site_a, "exit.site-a", b"{not json", "body: not JSON", {"expiration": "1000"}),
        # A forged sender header from a site (only the operator's is believed).
        "spoof-header": (
            site_a,
            "exit.site-a",
            spoof,
            "site: event names 'site-b'",
            {"user": 1, "headers": {SENDER_HEADER: secured.user("site-site-b")}},
        ),
        # A header pika cannot decode (a timestamp past year 9999) on a bad body.
        "undecodable-header": (
            site_a,
            "exit.site-a",
            b"{bad",
            "body: not JSON",
            {"headers": {"evil": RawTimestamp(2**64 - 1)}},
        ),
        # A time that overflows once converted to UTC (it used to kill job-state's batches).
        "time-overflow": (
            site_a,
            "exit.site-a",
            _exit("h-1", "site-a", occurred_at="0001-01-01T00:00:00+01:00"),
            "occurred_at:",
            {},
        ),
        # ... and on the jobs exchange, as the server.
        "transition-as-lifecycle": (
            server,
            "lifecycle.RUNNING",
            forged,
            "routing key: 'lifecycle.RUNNING'",
            {},
        ),
        "lifecycle-wrong-key": (
            server,
            "lifecycle.RUNNING",
            lifecycle_body,
            "routing key: 'lifecycle.RUNNING'",
            {},
        ),
        "lifecycle-huge": (
            server,
            "lifecycle.RUNNING",
            _with_raw(lifecycle("h-1", JobStatus.RUNNING).to_json(), "n", HUGE),
            "body: not JSON (a number too large",
            {},
        ),
        "lifecycle-dup": (
            server,
            "lifecycle.FINISHED.ABORTED",
            _with_raw(lifecycle_body, "status", b'"RUNNING"'),
            "body: not JSON (Detected duplicate key",
            {},
        ),
    }


def _status(store_url: str, job: str) -> JobStatus | None:
    store = open_store(store_url)
    try:
        view = store.get(job)
    finally:
        store.close()
    return view.status if view is not None else None


def _reach(store_url: str, job: str, status: JobStatus) -> Callable[[], bool]:
    return lambda: _status(store_url, job) is status


@pytest.mark.usefixtures("raw_timestamps")
def test_hostile_publishers_change_nothing_and_the_daemons_keep_applying(
    secured: Secured, pg_store_url: str
) -> None:
    names, admin, store = secured.names, secured.rabbit.url, pg_store_url
    exchanges = {"exit": names.events, "life": names.jobs}
    logs = secured.tmp / "hostile-logs"
    logs.mkdir(exist_ok=True)
    classifier = Daemon("classifier", secured.env("classifier"), logs / "classifier.log")
    job_state = Daemon(
        "job-state", secured.env("job-state", EXITPIPE_STORE=store), logs / "job-state.log"
    )
    drain_dead(admin, names)
    with daemons(classifier, job_state):
        for job in ("h-1", "h-2", "h-4"):
            done = secured.cli(
                "lifecycle", "--job", job, "--status", "RUNNING", "--sites", ",".join(SITES),
                role="server",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        wait_for(_reach(store, "h-1", JobStatus.RUNNING), 30, "job h-1 RUNNING")

        hostile = _hostile(secured)
        sent: dict[str, str] = {}
        for name, (role, key, body, _reason, props) in hostile.items():
            if props.pop("user", None):
                props["user_id"] = secured.user(role)
            exchange = exchanges["exit" if key.startswith("exit.") else "life"]
            sent[name] = _publish(secured.url(role), exchange, key, body, **props)
        ttl_sent = time.monotonic()

        # Good events after the hostile ones: both daemons must still be applying.
        done = secured.cli(
            "report", "--job", "h-2", "--site", "site-a", "--code", "EXCEPTION",
            role="site-site-a",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        done = secured.cli(
            "lifecycle", "--job", "h-3", "--status", "FINISHED:COMPLETED", role="server"
        )
        assert done.returncode == 0, done.stderr
        wait_for(_reach(store, "h-2", JobStatus.FINISHED_EXECUTION_EXCEPTION), 30, "h-2 fails")
        wait_for(_reach(store, "h-3", JobStatus.FINISHED_COMPLETED), 30, "h-3 completes")
        assert classifier.alive() and job_state.alive()

        # Past the 1 s expiration the "ttl" message carried: its dead letter must still be there.
        wait_for(lambda: time.monotonic() - ttl_sent > 1.5, 5, "the original's expiration")
        letters = {d.message_id: d for d in wait_for(
            lambda: _all_dead(admin, secured, len(hostile)), 30, "every hostile dead letter"
        )}  # fmt: skip
        for name, (_role, _key, _body, reason, _props) in hostile.items():
            letter = letters[sent[name]]
            assert letter.error is not None and letter.error.startswith(reason), (name, letter)
            assert letter.x_death is None, f"{name}: dead-lettered by the limit, not at once"
        assert _status(store, "h-1") is JobStatus.RUNNING, "a hostile message took effect"

        # The operator sends every dead letter back: each spoof is refused again.
        done = secured.cli("dead", "requeue", "--all", role="operator")
        assert done.returncode == 0, done.stderr
        again = {d.message_id: d for d in wait_for(
            lambda: _all_dead(admin, secured, len(hostile)), 30, "the spoofs refused again"
        )}  # fmt: skip
        for name in ("spoof-body", "spoof-user", "spoof-header", "transition-as-lifecycle"):
            assert again[sent[name]].error == letters[sent[name]].error, name
        assert _status(store, "h-1") is JobStatus.RUNNING
        drain_dead(admin, names)

    _a_legitimate_exit_requeued_gets_through(secured, store, logs)


def _all_dead(admin: str, secured: Secured, expected: int) -> list[DeadLetter] | None:
    """Every dead letter, left in the queue, once ``expected`` of them are there."""
    letters = drain_dead(admin, secured.names, take=False)
    return letters if len(letters) >= expected else None


def _a_legitimate_exit_requeued_gets_through(secured: Secured, store: str, logs: Any) -> None:
    """A real exit of site-a, dead-lettered by the delivery limit, requeued by the admin."""
    names, admin = secured.names, secured.rabbit.url
    body = _exit("h-4", "site-a")
    message_id = _publish(
        secured.url("site-site-a"),
        names.events,
        "exit.site-a",
        body,
        user_id=secured.user("site-site-a"),
    )
    _exhaust_delivery_limit(admin, names.classify)
    (letter,) = wait_for(
        lambda: drain_dead(admin, names, take=False), 30, "the delivery limit's letter"
    )
    assert letter.message_id == message_id and letter.x_death is not None
    classifier = Daemon(
        "classifier",
        secured.env("classifier", EXITPIPE_REQUIRE_SITE_USER="true"),
        logs / "classifier-strict.log",
    )
    job_state = Daemon(
        "job-state", secured.env("job-state", EXITPIPE_STORE=store), logs / "job-state-2.log"
    )
    with daemons(classifier, job_state):
        done = secured.cli("dead", "requeue", "--all", role="operator")
        assert done.returncode == 0, done.stderr
        wait_for(
            _reach(store, "h-4", JobStatus.FINISHED_EXECUTION_EXCEPTION),
            30,
            "the requeued legitimate exit to fail h-4",
        )
        # An administrator (no role user) cannot vouch with the header: refused as its own.
        forged = _publish(
            admin,
            names.events,
            "exit.site-b",
            _exit("h-5", "site-b"),
            user_id="guest",
            headers={SENDER_HEADER: secured.user("site-site-b")},
        )
        (letter,) = wait_for(lambda: drain_dead(admin, names), 30, "the forged header's letter")
        assert letter.message_id == forged
        assert letter.error is not None and "(user 'guest') is not a site user" in letter.error
    assert _status(store, "h-5") is None


def _exhaust_delivery_limit(admin: str, queue: str) -> None:
    """Take the one message in ``queue`` and give it back until the broker dead-letters it."""
    conn = pika.BlockingConnection(pika.URLParameters(admin))
    try:
        channel = conn.channel()
        for _ in range(20):
            method, _props, _body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                if int(channel.queue_declare(queue, passive=True).method.message_count) == 0:
                    return
                conn.sleep(0.1)
                continue
            channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        conn.close()
