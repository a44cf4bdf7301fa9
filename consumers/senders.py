"""Who may say what (DESIGN 3 and 4a), as pure functions of a message's envelope and body.

The broker authenticates the publisher: it refuses a ``user_id`` other than the login, and with
``exitpipe topology --users`` its topic permissions pin the routing keys each user may publish
with (a site only ``exit.<its site>``, the server only ``lifecycle.*``, the classifier only
``transition.*``). What ties a body to its sender is therefore the routing key, so every
consumer, and replay, refuses a body that disagrees with its key before anything else.

A dead letter sent back by ``exitpipe dead requeue`` is published by the operator, not by its
original sender, so it carries that sender in the header ``x-exitpipe-sender``. Any publisher
can write a header, so it is believed from one user only: ``<ns>-operator``, whose
``user_id`` the broker checks. From anyone else, the ``user_id`` is the sender.

In the dead-letter queue the same header is written by the daemons (with their own
``user_id``) when they dead-letter a message, and believed from them; a message the broker
dead-lettered itself (the delivery limit; its ``x-death`` says so) keeps the original
``user_id``, which is then its sender, and its reason and source come from ``x-death``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.events import Event, ExitEvent, Transition
from schemas.topology import SENDER_HEADER, Names, route


def sender_of(names: Names, user_id: str | None, headers: Mapping[str, Any] | None) -> str | None:
    """The authenticated sender of a message; None when nobody is."""
    if user_id == names.operator_user and headers and SENDER_HEADER in headers:
        return _vouched(headers)
    return user_id or None


def written_by_daemon(names: Names, user_id: str | None, headers: Mapping[str, Any]) -> bool:
    """Whether a dead letter was written by a daemon (else the broker dead-lettered it)."""
    if user_id in (names.classifier_user, names.job_state_user):
        return True
    return "x-death" not in headers


def dead_letter_sender(
    names: Names, user_id: str | None, headers: Mapping[str, Any] | None
) -> str | None:
    """The original sender of a message found in the dead-letter queue."""
    headers = headers or {}
    if written_by_daemon(names, user_id, headers) and SENDER_HEADER in headers:
        return _vouched(headers)
    return user_id or None


def _vouched(headers: Mapping[str, Any]) -> str | None:
    value = headers.get(SENDER_HEADER)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value) if value else None


def key_problem(names: Names, routing_key: str, event: Event) -> str | None:
    """Why ``routing_key`` does not agree with the body; None when it does."""
    expected = route(names, event)[1]
    if routing_key == expected:
        return None
    got = routing_key[:300]
    return f"routing key: {got!r} does not agree with the body, which needs {expected!r}"


def exit_problem(
    names: Names, routing_key: str, event: ExitEvent, sender: str | None, require_site_user: bool
) -> str | None:
    """Why the classifier refuses this exit event; None when it may be classified."""
    site_user = sender is not None and sender.startswith(names.site_prefix)
    if site_user and sender != names.site_user(event.site):
        assert sender is not None
        site = sender[len(names.site_prefix) :]
        return f"site: event names {event.site!r} but the sender is authenticated as site {site!r}"
    problem = key_problem(names, routing_key, event)
    if problem is not None or site_user:
        return problem
    if sender is not None and names.is_role_user(sender):
        return f"site: {sender!r} is not a site and may not report exits"
    if require_site_user:
        who = f"user {sender!r}" if sender else "no user_id"
        return (
            f"site: the sender ({who}) is not a site user {names.site_prefix}<site>,"
            " and EXITPIPE_REQUIRE_SITE_USER is set"
        )
    return None


def job_event_problem(
    names: Names, routing_key: str, event: Event, sender: str | None
) -> str | None:
    """Why job-state refuses this transition or lifecycle event; None when it may be applied."""
    if isinstance(event, ExitEvent):
        return f"schema: {event.schema_!r} does not belong on {names.jobs}"
    problem = key_problem(names, routing_key, event)
    if problem is not None or sender is None or not names.is_role_user(sender):
        return problem
    allowed = names.classifier_user if isinstance(event, Transition) else names.server_user
    if sender != allowed:
        kind = "transition" if isinstance(event, Transition) else "lifecycle event"
        return f"sender: {sender!r} may not publish a {kind}"
    return None


def refusal(
    names: Names,
    routing_key: str,
    event: Event,
    sender: str | None,
    require_site_user: bool = False,
) -> str | None:
    """Why the live pipeline refuses this event from this sender; None when it takes it."""
    if isinstance(event, ExitEvent):
        return exit_problem(names, routing_key, event, sender, require_site_user)
    return job_event_problem(names, routing_key, event, sender)
