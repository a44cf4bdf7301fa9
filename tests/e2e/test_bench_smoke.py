"""A tiny run of the benchmark, so it keeps working; the numbers are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_prints_rates_latencies_and_the_ratio(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--amqp-url",
            amqp_url,
            "--pg-url",
            pg_url,
            "-n",
            "300",
            "--rate",
            "200",
            "--paced-seconds",
            "1",
            "--replay-events",
            "2000",
            "--repeat",
            "2",
            "--stores",
            "sqlite,postgres",
            "--out",
            str(tmp_path),
            "--json",
        ],
        cwd=REPO,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert set(result["runs"]) == {"baseline", "exitpipe-sqlite", "exitpipe-postgres"}
    for name, r in result["runs"].items():
        assert r["max"]["rate"] > 0, name
        assert r["max"]["p99"] >= r["max"]["p50"] > 0, name
        assert r["paced"]["p99"] >= r["paced"]["p50"] > 0, name
    assert set(result["ratios"]) == {"exitpipe-sqlite", "exitpipe-postgres"}
    assert set(result["runs"]["exitpipe-sqlite"]["peak_rss"]) == {"job-state", "classifier-0"}
    cpu = result["runs"]["exitpipe-sqlite"]["max"]["cpu_us"]
    # 300 events are a few clock ticks of CPU: a process may show none, the run cannot.
    assert {"job-state", "classifier-0", "publisher"} <= set(cpu)
    assert all(us >= 0 for us in cpu.values()) and sum(cpu.values()) > 0
    assert {"relay", "sink", "publisher"} <= set(result["runs"]["baseline"]["max"]["cpu_us"])
    assert len(result["rounds"]) == 2
    for rnd in result["rounds"]:
        for ratio in rnd["ratios"].values():
            assert ratio["rate"] > 0 and ratio["paced_p50"] > 0 and ratio["paced_p99"] > 0
    for replay in result["replay"]:
        assert replay["events"] == 2000
        for form in ("json", "text"):
            assert replay[form]["exit"] == 0 and replay[form]["rate"] > 0
    assert "[bench" in run.stderr, "progress is shown"
    (raw,) = tmp_path.glob("bench-*.json")
    assert json.loads(raw.read_text())["rounds"] == result["rounds"]
    page = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(raw)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert page.returncode == 0, page.stderr
    assert page.stdout.startswith("# Performance") and "## Goals (issue 13)" in page.stdout
    # One row per round in the rounds table, and one in the CPU table.
    assert page.stdout.count("| exitpipe-sqlite |") == 4
    assert "CPU microseconds per event at the maximum rate" in page.stdout
