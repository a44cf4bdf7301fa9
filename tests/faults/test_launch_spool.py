"""The broker unreachable while ``exitpipe launch`` reports: spooled, then delivered once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.store.factory import open_store
from schemas.events import parse_body
from tests.faults.conftest import Scenario
from tests.faults.harness import daemons
from tests.support.proxy import Proxy

pytestmark = pytest.mark.faults
EX_TEMPFAIL = 75


def _exitpipe(scenario: Scenario, url: str, spool: Path, *args: str) -> subprocess.Popen[str]:
    env = scenario.env(amqp_url=url, EXITPIPE_SPOOL_DIR=str(spool), EXITPIPE_RETRY_SECONDS="1")
    cmd = [sys.executable, "-m", "exitpipe.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_launch_while_broker_unreachable(scenario: Scenario) -> None:
    spool = scenario.tmp / "spool"
    history = scenario.history()
    workers = {f"launch-{i}": rc for i, rc in enumerate([101, 103, 1, 0, 101, 103])}
    with Proxy("127.0.0.1", scenario.rabbit.port) as proxy, daemons(scenario.daemon("run")):
        proxy.refuse()
        url = proxy.url(scenario.url)
        launches = {
            job: _exitpipe(
                scenario,
                url,
                spool,
                "launch",
                "--job",
                job,
                "--site",
                "site-1",
                "--",
                sys.executable,
                "-c",
                f"raise SystemExit({rc})",
            )
            for job, rc in workers.items()
        }
        for job, process in launches.items():
            _, err = process.communicate(timeout=60)
            assert process.returncode == workers[job], err  # the worker's status, kept
            assert "kept in the spool" in err and "guest:guest" not in err, err
        spooled = [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]
        assert len(spooled) == len(workers)
        events = [parse_body(s["body"].encode()) for s in spooled]

        still_down = _exitpipe(scenario, url, spool, "spool", "flush")
        still_down.communicate(timeout=60)
        assert still_down.returncode == EX_TEMPFAIL
        proxy.passthrough()
        healed = time.monotonic()
        flush = _exitpipe(scenario, url, spool, "spool", "flush")
        out, err = flush.communicate(timeout=60)
        assert flush.returncode == 0, err
        assert f"delivered {len(workers)}, 0 left" in out, out
        again = _exitpipe(scenario, url, spool, "spool", "flush")
        out, _ = again.communicate(timeout=60)
        assert again.returncode == 0 and "delivered 0, 0 left" in out, out
        for event in events:
            history.add(event, str(event.event_id), "ok")
        scenario.checker(history).run(healed_at=healed)
    store = open_store(scenario.store_url)
    try:
        for event in events:
            view = store.get(event.job_id)
            if view is not None:  # ignored exits (codes 0 and 1) leave no job
                assert all(r.duplicates == 0 for r in view.history), view.as_json()
    finally:
        store.close()
