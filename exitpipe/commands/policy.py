"""``exitpipe policy check FILE`` and ``exitpipe policy show [NAME|FILE] [--json]``.

Both read a policy exactly as the classifier does at start (``load_policy``), so a file that
passes ``check`` is one the daemons accept. A refused policy is bad input: exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from consumers.policy import Policy, PolicyError, describe_policy, load_policy, policy_as_dict
from exitpipe.settings import Settings

EX_OK = 0
EX_BAD_INPUT = 2


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``policy check`` and ``policy show`` to the command line."""
    parser = subparsers.add_parser("policy", help="check or show a classification policy")
    actions = parser.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", parents=[common], help="validate a policy file; exit 2 with the problem if bad"
    )
    check.add_argument("file", metavar="FILE", help="TOML policy file (or a built-in name)")
    check.set_defaults(func=check_policy)
    show = actions.add_parser(
        "show", parents=[common], help="print a policy's rules and its decision for every code"
    )
    show.add_argument(
        "spec", nargs="?", metavar="NAME|FILE", help="built-in name or file (default: --policy)"
    )
    show.add_argument("--json", action="store_true", help="print the policy as one JSON object")
    show.set_defaults(func=show_policy)


def check_policy(args: argparse.Namespace, settings: Settings) -> int:
    """Print a one-line summary of a valid policy, or its problem on stderr."""
    policy = _load(args.file)
    if policy is None:
        return EX_BAD_INPUT
    count = len(policy.rules)
    noun = "rule" if count == 1 else "rules"
    print(f"ok: {policy.name} version {policy.version}, {count} {noun}")
    return EX_OK


def show_policy(args: argparse.Namespace, settings: Settings) -> int:
    """Print the policy given (or the configured one) as a table or as JSON."""
    policy = _load(args.spec or settings.policy)
    if policy is None:
        return EX_BAD_INPUT
    if args.json:
        print(json.dumps(policy_as_dict(policy), indent=2))
    else:
        print(describe_policy(policy))
    return EX_OK


def _load(spec: str) -> Policy | None:
    try:
        return load_policy(spec)
    except PolicyError as exc:
        print(f"exitpipe: {exc}", file=sys.stderr)
        return None
