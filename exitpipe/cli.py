"""The ``exitpipe`` console script: parse, build settings, run one command, map its exit status.

Exit statuses (DESIGN 6): 0 done, 1 not found / differences, 2 bad arguments or bad input,
69 broker unreachable with nothing kept, 75 event kept in the local spool.
"""

from __future__ import annotations

import argparse
import importlib
import os
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

# Command groups, each a module of exitpipe.commands with register(subparsers, common), and
# the commands each adds: a command line names one, and only its module is imported (most
# of a short command's time was importing the others: pika, the web server).
COMMAND_MODULES = {
    "policy": ("policy",),
    "producers": ("topology", "report", "lifecycle", "launch", "spool"),
    "daemons": ("classifier", "job-state", "run"),
    "jobs": ("jobs",),
    "demo": ("demo",),
    "replay": ("replay",),
    "archive": ("archive",),
    "dead": ("dead",),
    "config": ("config",),
    "nvflare": ("nvflare",),
    "web": ("web",),
}

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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line, assembled from the command modules: only the one that adds
    ``command`` when one is named, else all of them."""
    parser = argparse.ArgumentParser(
        prog="exitpipe", description="Decide what a worker's exit means for its job."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_parser()
    modules = [m for m, commands in COMMAND_MODULES.items() if command in commands]
    for name in modules or COMMAND_MODULES:
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
    """Run one command line; its exit status."""
    return _run(sys.argv[1:] if argv is None else list(argv))[0]


def console() -> None:
    """The console script: ``main``, then the exit.

    A command that holds a large heap until it ends (``replay``) says so with ``exit_at_once``:
    once its output is flushed, the process ends without freeing it object by object, which
    took a tenth of what a user waited for.
    """
    status, at_once = _run(sys.argv[1:])
    if at_once:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # a closed pipe: let the interpreter report it as it would
            sys.exit(status)
        os._exit(status)
    sys.exit(status)


def _run(argv: list[str]) -> tuple[int, bool]:
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    status = _call(args)
    return status, bool(getattr(args, "exit_at_once", False))


def _call(args: argparse.Namespace) -> int:
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
    console()
