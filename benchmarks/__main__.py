"""``python -m benchmarks``: exitpipe end to end against a raw pika two-hop baseline, one run.

Each measurement runs in a fresh namespace on the same broker, daemons as subprocesses:

- baseline: publisher (SelectConnection, many confirms in flight) -> quorum queue -> relay
  (pydantic validation, confirmed republish, ``multiple`` acks) -> quorum queue -> sink;
- exitpipe: N reportable exit events through ``producers.publisher.Publisher`` -> classifier
  -> job-state -> store commit -> ack, for SQLite and PostgreSQL.

For each: events/s at the maximum, and publish-to-applied latency p50/p95/p99 at the maximum
and at a paced rate; peak RSS of each daemon. ``--repeat N`` interleaves N rounds (baseline,
then each exitpipe store, N times), so that the ratios of each round compare runs minutes
apart: the rate ratio and the paced p50 and p99 latency ratios, exitpipe over baseline.
Progress goes to stderr; ``--json`` prints the results as one JSON object on stdout and
``--out DIR`` also writes them to ``DIR/bench-<time>.json`` (the raw results that
``python -m benchmarks.report`` turns into docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    BenchConfig,
    machine,
    measure_baseline,
    measure_exitpipe,
    measure_memory,
    measure_replay,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    p.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for the postgres store run ('' to skip it)",
    )
    p.add_argument("-n", "--events", type=int, default=20_000, help="events at the maximum rate")
    p.add_argument("--rate", type=float, default=2000.0, help="paced rate, events/s")
    p.add_argument("--paced-seconds", type=float, default=5.0, help="length of the paced run")
    p.add_argument("--prefetch", type=int, default=500)
    p.add_argument("--classifiers", type=int, default=1, help="classifier instances")
    p.add_argument("--stores", default="sqlite,postgres")
    p.add_argument(
        "--replay-events",
        type=int,
        default=100_000,
        help="events in the replay-from-file measurement (0 to skip)",
    )
    p.add_argument(
        "--memory",
        default="",
        help="SMALL,LARGE: daemon RSS after SMALL and after LARGE events (SQLite)",
    )
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--archive-baseline",
        action="store_true",
        help="also run the baseline with each hop fanned out into a stream, "
        "the broker work exitpipe's archive adds",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds of every run")
    p.add_argument("--out", type=Path, help="also write the raw results to DIR/bench-<time>.json")
    return p.parse_args(argv)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def table(results: dict[str, Any]) -> str:
    """The results as a table for people."""
    base = results["runs"].get("baseline", {}).get("max", {}).get("rate")
    head = [
        "run",
        "events/s",
        "ratio",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "paced p50",
        "paced p95",
        "paced p99",
        "peak RSS MiB",
        "CPU us/event at the maximum",
    ]
    rows = []
    for name, r in results["runs"].items():
        m, pc = r["max"], r.get("paced", {})
        ratio = f"{m['rate'] / base:.2f}" if base and not name.startswith("baseline") else "-"
        rss = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r.get("peak_rss", {}).items()) or "-"
        rows.append(
            [
                name,
                f"{m['rate']:.0f}",
                ratio,
                _ms(m.get("p50")),
                _ms(m.get("p95")),
                _ms(m.get("p99")),
                _ms(pc.get("p50")),
                _ms(pc.get("p95")),
                _ms(pc.get("p99")),
                rss,
                cpu_text(m.get("cpu_us", {})),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def cpu_text(cpu: dict[str, float]) -> str:
    """``broker 120, relay 60, ...``: CPU microseconds per event of each process, and the sum."""
    if not cpu:
        return "-"
    parts = [f"{role} {us:.0f}" for role, us in cpu.items()]
    return ", ".join([*parts, f"total {sum(cpu.values()):.0f}"])


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print the table (or JSON)."""
    args = _parse(argv)
    config = BenchConfig(
        amqp_url=args.amqp_url,
        events=args.events,
        rate=args.rate,
        paced_seconds=args.paced_seconds,
        prefetch=args.prefetch,
        classifiers=args.classifiers,
        pg_url=args.pg_url,
    )
    started = time.time()
    rounds = [_round(args, config) for _ in range(max(1, args.repeat))]
    results: dict[str, Any] = {
        "config": config.__dict__ | {"amqp_url": "(redacted)", "repeat": len(rounds)},
        "started": started,
        "machine": machine(),
        "rounds": rounds,
        # The first round under the names earlier readers of the results know.
        "runs": rounds[0]["runs"],
        "ratios": {k: v["rate"] for k, v in rounds[0]["ratios"].items()},
    }
    if args.replay_events:
        results["replay"] = [measure_replay(args.replay_events) for _ in rounds]
    if args.memory:
        small, large = (int(x) for x in args.memory.split(","))
        results["memory"] = measure_memory(config, small, large)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        path = args.out / f"bench-{stamp}.json"
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"raw results: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print("\n\n".join(table({**results, "runs": r["runs"]}) for r in rounds))
        print(replay_lines(results.get("replay", [])))
    return 0


def _round(args: argparse.Namespace, config: BenchConfig) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    if not args.skip_baseline:
        runs["baseline"] = measure_baseline(config)
        if args.archive_baseline:
            runs["baseline+archive"] = measure_baseline(config, archive=True)
    for store in [s for s in args.stores.split(",") if s]:
        if store == "postgres" and not args.pg_url:
            continue
        runs[f"exitpipe-{store}"] = measure_exitpipe(config, store)
    return {"runs": runs, "ratios": ratios(runs)}


def ratios(runs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each exitpipe run over the baseline of the same round: rate and paced latencies."""
    base = runs.get("baseline")
    if base is None:
        return {}
    out = {}
    for name, run in runs.items():
        if name.startswith("baseline"):
            continue
        out[name] = {
            "rate": run["max"]["rate"] / base["max"]["rate"],
            "paced_p50": _over(run["paced"].get("p50"), base["paced"].get("p50")),
            "paced_p99": _over(run["paced"].get("p99"), base["paced"].get("p99")),
        }
    return out


def _over(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def replay_lines(replays: list[dict[str, Any]]) -> str:
    """One line per replay measurement: whole-process rates, JSON and text output."""
    return "\n".join(
        f"replay --file {r['events']} events: --json {r['json']['rate']:.0f}/s "
        f"({r['json']['wall_s']:.2f} s), text {r['text']['rate']:.0f}/s "
        f"({r['text']['wall_s']:.2f} s), whole process, output included"
        for r in replays
    )


if __name__ == "__main__":
    sys.exit(main())
