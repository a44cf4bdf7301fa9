"""Plain-text tables for people (``--json`` is for machines)."""

from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, with a header underline."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(headers, *cells, strict=True)]
    # One format per table, applied in C: a large replay prints a row per event.
    line = "  ".join(f"{{:<{w}}}" for w in widths).format
    lines = [line(*headers), line(*("-" * w for w in widths))]
    lines += [line(*row) for row in cells]
    return "\n".join(text.rstrip() for text in lines)


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)
