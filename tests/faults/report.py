"""Rewrite the figures table of docs/RELIABILITY.md from the fault suite's JSON lines.

    python -m tests.faults.report [results.jsonl]

The file defaults to ``EXITPIPE_FAULTS_RESULTS`` (or the suite's default temporary file); the
last line of each scenario wins, so the table shows the latest run of every scenario.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.faults.harness import results_path

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
COLUMNS = (
    "scenario",
    "attempted",
    "confirmed",
    "indeterminate",
    "applied",
    "ignored",
    "dead_lettered",
    "lost",
    "duplicate_effects",
    "wrong_final_states",
    "recover_s",
)


def table(lines: list[dict[str, object]]) -> str:
    """The markdown table of the latest line of each scenario, by scenario name."""
    latest = {line["scenario"]: line for line in lines}
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in sorted(latest, key=str):
        line = latest[name]
        cells = ["-" if line.get(c) is None else str(line.get(c)) for c in COLUMNS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def rewrite(doc: str, lines: list[dict[str, object]]) -> str:
    """``doc`` with the text between the markers replaced by the table."""
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC}: the markers {BEGIN} and {END} are missing")
    return f"{head}{BEGIN}\n{table(lines)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else results_path()
    lines = [json.loads(t) for t in source.read_text(encoding="utf-8").splitlines() if t.strip()]
    DOC.write_text(rewrite(DOC.read_text(encoding="utf-8"), lines), encoding="utf-8")
    print(f"{DOC}: {len({line['scenario'] for line in lines})} scenarios from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
