"""Print the cluster suite's figures as Markdown tables, for README and docs/RELIABILITY.md.

    EXITPIPE_CLUSTER_RESULTS=cluster.jsonl pytest -m cluster tests/cluster
    python -m tests.cluster.report cluster.jsonl [--update docs/RELIABILITY.md]

The last line of each scenario wins. With ``--update`` the tables replace what stands between
``<!-- cluster:begin -->`` and ``<!-- cluster:end -->`` in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- cluster:begin -->", "<!-- cluster:end -->"
FAULTS = ("scenario", "fault", "confirmed", "indeterminate", "lost", "duplicate_effects",
          "wrong_final_states", "resume_s")  # fmt: skip
LAUNCHES = ("scenario", "launches", "spooled", "lost", "duplicate_effects", "wrong_final_states",
            "launch_s_p50", "launch_s_max")  # fmt: skip
THROUGHPUT = ("instances", "events", "seconds", "events_per_s", "same_as_single")


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(out)


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def tables(lines: list[dict[str, Any]]) -> str:
    """The failover, launcher and throughput tables of the latest line of each scenario."""
    latest = {line["scenario"]: line for line in lines}
    faults = [v for v in latest.values() if "resume_s" in v]
    launches = [v for v in latest.values() if "launches" in v]
    speed = sorted(
        (v for v in latest.values() if "events_per_s" in v), key=lambda v: v["instances"]
    )
    return "\n\n".join(
        [_table(faults, FAULTS), _table(launches, LAUNCHES), _table(speed, THROUGHPUT)]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.report")
    parser.add_argument("results", nargs="?", default=os.environ.get("EXITPIPE_CLUSTER_RESULTS"))
    parser.add_argument("--update", type=Path, help="rewrite the tables between the markers")
    args = parser.parse_args(argv)
    if not args.results:
        parser.error("name the results file (or set EXITPIPE_CLUSTER_RESULTS)")
    text = Path(args.results).read_text(encoding="utf-8")
    found = tables([json.loads(t) for t in text.splitlines() if t.strip()])
    if args.update is None:
        print(found)
        return 0
    doc = args.update.read_text(encoding="utf-8")
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        parser.error(f"{args.update}: the markers {BEGIN} and {END} are missing")
    args.update.write_text(f"{head}{BEGIN}\n{found}\n{END}{tail}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
