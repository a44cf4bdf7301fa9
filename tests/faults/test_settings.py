"""A heartbeat of 0 would disable dead-link detection: the settings refuse it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from exitpipe.settings import Settings
from tests.faults.harness import daemon_env

pytestmark = pytest.mark.faults


def test_heartbeat_zero_is_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat"):
        Settings(heartbeat=0)
    env = daemon_env("amqp://guest:guest@127.0.0.1:1/%2F", "f-hb0", "memory://")
    env["EXITPIPE_HEARTBEAT"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "heartbeat" in done.stderr, done.stderr
