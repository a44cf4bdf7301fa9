"""The ``exitpipe`` console script: parse, build settings, run one command, map its exit status.

Exit statuses (DESIGN 6): 0 done, 1 not found / differences, 2 bad arguments or bad input,
69 broker unreachable with nothing kept, 75 event kept in the local spool.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from exitpipe.settings import Settings

EX_OK = 0
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_SOFTWARE = 70  # an internal error (a bug), never one of the statuses above

# Command groups, each a module of exitpipe.commands with register(subparsers, common).
COMMAND_MODULES = (
    "policy",
    "producers",
    "daemons",
    "jobs",
    "demo",
    "replay",
    "archive",
    "dead",
    "config",
    "nvflare",
    "web",
)

# Flags that override EXITPIPE_* settings; every command accepts them.
SETTING_FLAGS = {
    "amqp_url": "--amqp-url",
    "namespace": "--namespace",
    "store": "--store",
    "policy": "--policy",
    "spool_dir": "--spool-dir",
    "heartbeat": "--heartbeat",
    "retry_seconds": "--retry-seconds",
    "prefetch": "--prefetch",
    "metrics_port": "--metrics-port",
    "log_format": "--log-format",
}


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings (override EXITPIPE_* variables)")
    for dest, flag in SETTING_FLAGS.items():
        group.add_argument(flag, dest=f"setting_{dest}", default=None, metavar=dest.upper())
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, assembled from the command modules."""
    parser = argparse.ArgumentParser(
        prog="exitpipe", description="Decide what a worker's exit means for its job."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_parser()
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"exitpipe.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"exitpipe.commands.{name}":
                raise
            continue
        module.register(subparsers, common)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings with the flags given on the command line taking precedence."""
    given: dict[str, Any] = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"])
            print(f"exitpipe: setting {field}: {err['msg']}", file=sys.stderr)
        return EX_USAGE
    try:
        result: int = args.func(args, settings)
    except Exception:  # a bug: never let it pass for a documented exit status (1, 2, 69, 75)
        traceback.print_exc()
        print(f"exitpipe: internal error; exit status {EX_SOFTWARE}", file=sys.stderr)
        return EX_SOFTWARE
    return result


if __name__ == "__main__":
    sys.exit(main())
