"""``exitpipe demo [--keep]``."""

from __future__ import annotations

import argparse
from typing import Any

from consumers.observe import setup_logging


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``demo``."""
    p = subparsers.add_parser(
        "demo", parents=[common], help="run the whole pipeline on the local broker with a scenario"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the namespace and the store afterwards, and print their names",
    )
    p.add_argument("--timeout", type=float, default=25.0, help="seconds to wait for the store")
    p.add_argument("--verbose", action="store_true", help="show the daemons' decision log")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, settings: Any) -> int:
    from exitpipe.demo import run_demo

    setup_logging(settings.log_format, level=20 if args.verbose else 30)
    return run_demo(settings, keep=args.keep, timeout=args.timeout)
