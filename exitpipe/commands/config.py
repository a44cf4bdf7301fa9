"""``exitpipe config table`` and ``exitpipe config show``: the settings, for operators.

The table is generated from ``Settings.model_fields`` (the README carries its output between
markers and a test compares the two), so a new setting cannot go undocumented. Neither
command ever prints a password: every URL goes through ``redact``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic.fields import FieldInfo

from exitpipe.commands.table import render
from exitpipe.settings import Settings, redact

ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))
START_MARKER = "<!-- settings-table:start -->"
END_MARKER = "<!-- settings-table:end -->"


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``config table`` and ``config show``."""
    config = subparsers.add_parser("config", help="the EXITPIPE_* settings")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    table = sub.add_parser("table", help="Markdown table of every EXITPIPE_* variable")
    table.add_argument(
        "--update",
        metavar="FILE",
        type=Path,
        help=f"rewrite the table between {START_MARKER} and {END_MARKER} in FILE",
    )
    table.set_defaults(func=print_table)
    show = sub.add_parser("show", parents=[common], help="the effective settings, redacted")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=show_settings)


def print_table(args: argparse.Namespace, _settings: Settings) -> int:
    """Print the settings table, or write it into a file between the markers."""
    if args.update is None:
        print(settings_table())
        return 0
    try:
        text = args.update.read_text(encoding="utf-8")
        args.update.write_text(replace_table(text, settings_table()), encoding="utf-8")
    except (OSError, ValueError) as exc:
        print(f"exitpipe: {args.update}: {exc}", file=sys.stderr)
        return 2
    return 0


def settings_table() -> str:
    """One Markdown row per setting: variable, default, meaning."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        cells = [f"`{env_name(name)}`", _default(field), _meaning(field)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with whatever stands between the markers replaced by ``table``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {START_MARKER} ... {END_MARKER} block")
    return f"{text[: start + len(START_MARKER)]}\n{table}\n{text[end:]}"


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return f"{ENV_PREFIX}{field}".upper()


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        doc = (field.default_factory.__doc__ or "").strip().splitlines()
        return doc[0] if doc else "computed at start"
    if field.default is None:
        return "unset"
    return f"`{_redacted(field.default)}`"


def _meaning(field: FieldInfo) -> str:
    values = _values(field)
    description = field.description or ""
    return f"{description} {values}".strip() if values else description


def _values(field: FieldInfo) -> str:
    """The accepted values, from the annotation and the constraints."""
    if typing.get_origin(field.annotation) is typing.Literal:
        return "One of " + ", ".join(f"`{c}`" for c in typing.get_args(field.annotation)) + "."
    low = high = pattern = None
    for item in field.metadata:
        if isinstance(item, Ge | Gt):
            low = f"at least {item.ge}" if isinstance(item, Ge) else f"above {item.gt}"
        elif isinstance(item, Le | Lt):
            high = f"at most {item.le}" if isinstance(item, Le) else f"below {item.lt}"
        elif getattr(item, "pattern", None):
            pattern = f"Must match `{item.pattern}`."
    if low and high:
        return f"{low.capitalize()}, {high}."
    if low or high:
        return f"{(low or high or '').capitalize()}."
    return pattern or ""


def show_settings(args: argparse.Namespace, settings: Settings) -> int:
    """Print the settings in effect, where each came from, and no password."""
    values = {name: _plain(getattr(settings, name)) for name in Settings.model_fields}
    if args.json:
        print(json.dumps(values, indent=2))
        return 0
    rows = [[env_name(name), value, _source(args, name)] for name, value in values.items()]
    print(render(["variable", "value", "from"], rows))
    return 0


def _plain(value: object) -> Any:
    if value is None or isinstance(value, int | float):
        return value
    return _redacted(value)


def _redacted(value: object) -> str:
    text = str(value)
    return redact(text) if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) else text


def _source(args: argparse.Namespace, name: str) -> str:
    if getattr(args, f"setting_{name}", None) is not None:
        return "flag"
    variable = env_name(name)
    if any(key.upper() == variable for key in os.environ):
        return "environment"
    return "default"
