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
    amqp_url: str, pg_url: str
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
    assert result["replay"]["events"] == 2000 and result["replay"]["exit"] == 0
    assert "[bench" in run.stderr, "progress is shown"
