"""Broker users per role (``exitpipe topology --users``), on the private node only.

What each test proves:

- a site's user cannot publish an exit under another site's routing key (topic permission),
  cannot publish on ``<ns>.jobs`` at all (no forged transition, no lifecycle), and cannot
  forge ``user_id`` (the broker checks it against the login); the server's user cannot
  forge a transition either. Nothing refused reaches a work queue.
- the daemons run end to end under their own restricted users (their declare at start falls
  back to checking): a real exit from site-a fails a job, while site-a's exit that names
  site-b in its body (under its own routing key) is dead-lettered with the reason.
- re-running ``--users`` is idempotent and keeps the passwords; ``--print`` holds none.
- no password appears in any daemon log or command output, but the one-time print.

The classifier's attribution rule itself is checked without a broker at the end.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.spec import BasicProperties

from consumers.amqp import ACK, DeadLetter, Delivery, Forward
from consumers.classifier import ClassifierHandler
from consumers.policy import load_policy
from consumers.store.factory import open_store
from producers.errors import PublishRefused
from producers.publisher import Outgoing, Publisher
from schemas.codes import Code, JobStatus
from schemas.topology import Names
from tests.faults.conftest import SITES, Secured, users_argv
from tests.faults.harness import (
    Daemon,
    daemons,
    drain_dead,
    exit_event,
    wait_for,
)

pytestmark = pytest.mark.faults


def _exit_body(job: str, site: str, code: Code = Code.EXCEPTION) -> tuple[str, bytes]:
    event = exit_event(job, site, code, int(code))
    return str(event.event_id), event.to_json()


def _count(url: str, queue: str) -> int:
    """Messages waiting in ``queue`` (no consumer runs and no broker restarted meanwhile)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def _publish(url: str, message: Outgoing) -> None:
    with Publisher(url, retry_seconds=5, connect_timeout=5) as publisher:
        (outcome,) = publisher.publish([message])
        assert outcome.value == "confirmed", outcome


def _refused(url: str, message: Outgoing) -> str:
    publisher = Publisher(url, retry_seconds=5, connect_timeout=5)
    with publisher, pytest.raises(PublishRefused) as caught:
        publisher.publish([message])
    return str(caught.value)


# -- (a), (c), (d): what the broker refuses ----------------------------------------------------


def test_a_site_cannot_publish_as_another_site(secured: Secured) -> None:
    names, site_a = secured.names, secured.url("site-site-a")
    before = _count(secured.rabbit.url, names.classify)
    message_id, body = _exit_body("sec-a", "site-b")
    why = _refused(site_a, Outgoing(names.events, "exit.site-b", body, message_id))
    assert "ACCESS_REFUSED" in why and "exit.site-b" in why
    message_id, body = _exit_body("sec-a", "site-a")
    _publish(site_a, Outgoing(names.events, "exit.site-a", body, message_id))  # its own: fine
    assert _count(secured.rabbit.url, names.classify) == before + 1
    # The CLI says so before spooling anything (the broker would refuse it at every flush).
    done = secured.cli(
        "report", "--job", "sec-a", "--site", "site-b", "--code", "EXCEPTION", role="site-site-a"
    )
    assert done.returncode == 2 and "site: 'site-b' is not the site" in done.stderr
    assert not (secured.tmp / "spool").exists() or not any((secured.tmp / "spool").iterdir())


def test_a_site_cannot_publish_a_transition_or_lifecycle(secured: Secured) -> None:
    names = secured.names
    before = _count(secured.rabbit.url, names.job_state)
    forged = json.dumps({"schema": "exitpipe.transition/1", "job_id": "sec-c"}).encode()
    for role, key in [
        ("site-site-a", "transition.fail"),
        ("site-site-a", "lifecycle.FINISHED.ABORTED"),
        ("server", "transition.fail"),  # the server may only publish lifecycle events
    ]:
        why = _refused(secured.url(role), Outgoing(names.jobs, key, forged, str(uuid.uuid4())))
        assert "ACCESS_REFUSED" in why, (role, key, why)
    assert _count(secured.rabbit.url, names.job_state) == before


def test_a_forged_user_id_is_refused_by_the_broker(secured: Secured) -> None:
    names = secured.names
    before = _count(secured.rabbit.url, names.classify)
    message_id, body = _exit_body("sec-d", "site-a")
    conn = pika.BlockingConnection(pika.URLParameters(secured.url("site-site-a")))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = BasicProperties(
            message_id=message_id, delivery_mode=2, user_id=secured.user("site-site-b")
        )
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            channel.basic_publish(names.events, "exit.site-a", body, props, mandatory=True)
    finally:
        if conn.is_open:
            conn.close()
    assert caught.value.reply_code == 406 and "user_id property set to" in caught.value.reply_text
    assert _count(secured.rabbit.url, names.classify) == before


# -- (b), (e): the daemons under their own users -------------------------------------------------


def _drain(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_purge(queue)
    finally:
        conn.close()


def test_the_daemons_run_as_their_users_and_attribute_exits(secured: Secured) -> None:
    names, admin = secured.names, secured.rabbit.url
    _drain(admin, names.classify)  # left by the tests above
    logs = secured.tmp / "logs"
    logs.mkdir(exist_ok=True)
    classifier = Daemon("classifier", secured.env("classifier"), logs / "classifier.log")
    job_state = Daemon("job-state", secured.env("job-state"), logs / "job-state.log")
    with daemons(classifier, job_state):
        for job in ("sec-e", "sec-b"):
            done = secured.cli(
                "lifecycle",
                "--job",
                job,
                "--status",
                "RUNNING",
                "--sites",
                ",".join(SITES),
                role="server",
            )
            assert done.returncode == 0, done.stderr
        # (b) site-a, under its own routing key, says site-b's worker failed job sec-b.
        forged_id, body = _exit_body("sec-b", "site-b")
        _publish(secured.url("site-site-a"), Outgoing(names.events, "exit.site-a", body, forged_id))
        # (e) site-a's real exit fails job sec-e.
        done = secured.cli(
            "report",
            "--job",
            "sec-e",
            "--site",
            "site-a",
            "--code",
            "EXCEPTION",
            role="site-site-a",
        )
        assert done.returncode == 0, done.stderr
        real_id = done.stdout.strip()

        def status(job: str) -> JobStatus | None:
            store = open_store(f"sqlite:///{secured.tmp / 'jobs.db'}")
            try:
                view = store.get(job)
            finally:
                store.close()
            return view.status if view is not None else None

        wait_for(
            lambda: status("sec-e") is JobStatus.FINISHED_EXECUTION_EXCEPTION,
            30,
            "site-a's exit to fail job sec-e",
        )
        dead = wait_for(lambda: drain_dead(admin, names), 30, "the forged exit's dead letter")
    (letter,) = dead
    assert letter.message_id == forged_id and letter.source == names.classify
    assert (
        letter.error
        == "site: event names 'site-b' but the sender is authenticated as site 'site-a'"
    )
    assert status("sec-b") is JobStatus.RUNNING  # site-a could not fail it as site-b
    store = open_store(f"sqlite:///{secured.tmp / 'jobs.db'}")
    try:
        view = store.get("sec-e")
    finally:
        store.close()
    assert view is not None and [r.event_id for r in view.history][-1] == real_id
    for d in (classifier, job_state):
        secured.outputs.append(d.log.read_text(errors="replace"))
        assert "cannot declare" not in secured.outputs[-1]


# -- idempotence, --print, and (f) no password anywhere ----------------------------------------


def test_users_again_keep_the_passwords_and_print_none(secured: Secured) -> None:
    done = secured.cli(*users_argv(secured.rabbit))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exists; password unchanged") == len(secured.passwords)
    check = secured.rabbit.ctl(
        "authenticate_user",
        secured.user("classifier"),
        secured.passwords[secured.user("classifier")],
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    printed = secured.cli("topology", "--users", "site-a", "--print", "-n", "node@host")
    assert printed.returncode == 0
    assert "set_topic_permissions -p / " + secured.user("site-site-a") in printed.stdout
    assert '"$EXITPIPE_PASSWORD_SITE_SITE_A" | rabbitmqctl -n node@host add_user' in printed.stdout


def test_no_password_in_any_log_or_output(secured: Secured) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    done = secured.cli(
        "report",
        "--job",
        "sec-f",
        "--site",
        "site-a",
        "--code",
        "SUCCESS",
        EXITPIPE_AMQP_URL=secured.url("site-site-a", wrong),
        EXITPIPE_RETRY_SECONDS="2",
    )
    assert done.returncode in (69, 75), done.stderr
    assert "***" in done.stderr  # the URL is named, redacted
    daemon = Daemon(
        "classifier",
        secured.env(None, EXITPIPE_AMQP_URL=secured.url("classifier", wrong)),
        secured.tmp / "wrong.log",
    ).start()
    try:
        wait_for(lambda: "cannot" in daemon.log.read_text(errors="replace"), 30, "a refused login")
    finally:
        daemon.stop()
    secured.outputs.append(daemon.log.read_text(errors="replace"))
    text = "\n".join(secured.outputs)
    assert len(secured.outputs) > 10, "the earlier tests' outputs are checked too"
    for secret in [*secured.passwords.values(), wrong]:
        assert secret not in text
    assert all(p in secured.first_output for p in secured.passwords.values())  # shown once


# -- the attribution rule, without a broker ----------------------------------------------------

POLICY = load_policy("nvflare-2.8")
NAMES = Names("ns")


def _delivery(site: str, user_id: str | None, code: Code = Code.EXCEPTION) -> Delivery:
    event = exit_event("job-1", site, code, int(code))
    props = BasicProperties(message_id=str(event.event_id), user_id=user_id)
    return Delivery(1, event.to_json(), props, f"exit.{site}", False, 1)


@pytest.mark.parametrize(
    ("site", "user_id", "require", "expected"),
    [
        ("a", "ns-site-a", False, Forward),
        ("a", "ns-site-a", True, Forward),
        (
            "b",
            "ns-site-a",
            False,
            "site: event names 'b' but the sender is authenticated as site 'a'",
        ),
        (
            "b",
            "ns-site-a",
            True,
            "site: event names 'b' but the sender is authenticated as site 'a'",
        ),
        ("a", None, False, Forward),
        ("a", "guest", False, Forward),
        ("a", "other-site-a", False, Forward),  # another namespace's user is not this one's site
        ("a", None, True, "site: the sender (no user_id) is not a site user ns-site-<site>"),
        ("a", "guest", True, "site: the sender (user 'guest') is not a site user"),
    ],
)
def test_the_classifier_attributes_an_exit_to_its_sender(
    site: str, user_id: str | None, require: bool, expected: Any
) -> None:
    handler = ClassifierHandler(POLICY, NAMES, require_site_user=require)
    action = handler.handle(_delivery(site, user_id))
    if isinstance(expected, str):
        assert isinstance(action, DeadLetter) and action.reason.startswith(expected), action
    else:
        assert isinstance(action, expected), action


def test_an_ignored_exit_from_the_wrong_site_is_still_dead_lettered() -> None:
    handler = ClassifierHandler(POLICY, NAMES)
    assert handler.handle(_delivery("a", "ns-site-a", Code.SUCCESS)) is ACK
    action = handler.handle(_delivery("b", "ns-site-a", Code.SUCCESS))
    assert isinstance(action, DeadLetter)
