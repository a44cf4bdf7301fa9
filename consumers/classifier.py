"""The classifier handler: exit event in, transition out (or nothing), decided by the policy.

It does not deduplicate: a repeated exit event gives a repeated transition with the same
event id, and the store makes the second one a no-op.

It attributes each exit to its sender (``consumers.senders``): the routing key must agree
with the body's ``site``, and a site's authenticated user must be that site's, so site A
cannot fail a job as site B. With ``require_site_user``, an exit event published without a
site user (no ``user_id``, or another user) is dead-lettered too.
"""

from __future__ import annotations

import logging

from consumers.amqp import ACK, Action, Delivery, Forward, dead_letter
from consumers.observe import EVENTS, DecisionLog
from consumers.policy import Decision, Policy, decide, transition_body
from consumers.senders import exit_problem, sender_of
from schemas.codes import Action as Verdict
from schemas.events import EXIT_SCHEMA, EXIT_SCHEMA_V1, BadMessage, ExitEvent, parse_body
from schemas.topology import Names

log = logging.getLogger("exitpipe.classifier")
_ACCEPT = frozenset({EXIT_SCHEMA, EXIT_SCHEMA_V1})


class ClassifierHandler:
    """Validates, classifies and forwards; bad input goes to the dead-letter queue."""

    def __init__(self, policy: Policy, names: Names, *, require_site_user: bool = False) -> None:
        self.policy = policy
        self.names = names
        self.require_site_user = require_site_user
        self._log = DecisionLog("exitpipe.classifier")
        self._counted = {a: EVENTS.labels("classifier", a.value, "") for a in Verdict}
        self._keys = {a: f"transition.{a.value}" for a in Verdict}

    def handle(self, delivery: Delivery) -> Action:
        """The action for one delivery of ``<ns>.classify``."""
        props = delivery.properties
        sender = sender_of(self.names, props.user_id, props.headers)
        try:
            event = parse_body(delivery.body, _ACCEPT)
        except BadMessage as exc:
            return dead_letter("classifier", delivery, exc.reason, sender)
        assert isinstance(event, ExitEvent)
        problem = exit_problem(
            self.names, delivery.routing_key, event, sender, self.require_site_user
        )
        if problem is not None:
            return dead_letter("classifier", delivery, problem, sender)
        decision = decide(event, self.policy)
        if self._log.enabled:
            self._log_decision(event, decision)
        self._counted[decision.action].inc()
        if decision.action is Verdict.IGNORE:
            return ACK
        event_id = str(event.event_id)
        body = transition_body(event, decision)
        return Forward(self.names.jobs, self._keys[decision.action], body, event_id)

    def _log_decision(self, event: ExitEvent, decision: Decision) -> None:
        self._log.emit(
            "decision",
            {
                "job_id": event.job_id,
                "event_id": str(event.event_id),
                "site": event.site,
                "code": event.effective_code.name,
                "return_code": event.return_code,
                "decision": decision.action.value,
                "policy": decision.policy.name,
                "policy_version": decision.policy.version,
                "rule": decision.policy.rule,
            },
        )
