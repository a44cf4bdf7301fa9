"""``exitpipe classifier``, ``exitpipe job-state`` and ``exitpipe run``: the consumer daemons."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

from consumers.observe import setup_logging
from consumers.policy import PolicyError, load_policy
from consumers.store import Store, StoreError, StoreUnavailable
from consumers.store.factory import open_store
from exitpipe.runtime import Pipeline
from exitpipe.settings import Settings, redact

log = logging.getLogger("exitpipe")

_DAEMONS = {
    "classifier": ("classify exit events and forward fail/stop transitions", True, False),
    "job-state": ("apply transitions and lifecycle events to the job store", False, True),
    "run": ("both daemons in one process, for a single host", True, True),
}


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the daemon commands."""
    for name, (help_text, classify, apply) in _DAEMONS.items():
        p = subparsers.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=lambda a, s, c=classify, j=apply: run_daemons(s, c, j))


def _open_store(url: str) -> Store:
    """Open the store, waiting out a database that is not up yet (never a crash loop)."""
    retrying = Retrying(
        retry=retry_if_exception_type(StoreUnavailable),
        wait=wait_exponential_jitter(multiplier=0.5, max=10.0),
        before_sleep=lambda state: log.warning(
            "store %s unavailable (%s); retry %d",
            redact(url),
            state.outcome.exception() if state.outcome else None,
            state.attempt_number,
        ),
        reraise=True,
    )
    return retrying(open_store, url)


def run_daemons(settings: Settings, classify: bool, apply: bool) -> int:
    """Run the chosen consumers until SIGTERM or SIGINT."""
    setup_logging(settings.log_format)
    try:
        policy = load_policy(settings.policy) if classify else None
        store = _open_store(settings.store) if apply else None
    except (PolicyError, StoreError) as exc:
        print(f"exitpipe: {exc}", file=sys.stderr)
        return 2
    log.info(
        "starting broker=%s namespace=%s policy=%s store=%s",
        redact(settings.amqp_url),
        settings.namespace,
        f"{policy.name}@{policy.version}" if policy else "-",
        redact(settings.store) if apply else "-",
    )
    return Pipeline(settings, policy=policy, store=store).run_until_signal()
