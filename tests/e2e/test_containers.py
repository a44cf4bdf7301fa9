"""compose.yaml for real: the whole stack in containers on a Docker engine.

The images are the ones compose.yaml is told to use: RABBITMQ_IMAGE, POSTGRES_IMAGE and
PYTHON_IMAGE from the environment, else those of containers/images.env when
`bash containers/build` has made them (no registry needed), else the official images. The
exitpipe image is built from this tree by `docker-compose build`. Every port is published on
127.0.0.1 at a free port, so the host talks to the containers only through those, and the stack
is a compose project of its own, taken down (volumes too) at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXITPIPE = Path(sys.executable).parent / "exitpipe"
IMAGE_VARIABLES = ("PYTHON_IMAGE", "RABBITMQ_IMAGE", "POSTGRES_IMAGE")
PORT_VARIABLES = (
    "RABBITMQ_PORT",
    "RABBITMQ_UI_PORT",
    "CLASSIFIER_METRICS_PORT",
    "JOB_STATE_METRICS_PORT",
)
T = TypeVar("T")


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI must run the stack (.ci/run starts the engine)")
    pytest.skip(message)


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    info = subprocess.run([docker, "info"], capture_output=True, timeout=30)
    return info.returncode == 0


def local_images() -> dict[str, str]:
    """containers/images.env as a dict."""
    pairs = (
        line.split("=", 1)
        for line in (REPO / "containers" / "images.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {name: value for name, value in pairs}


def image_exists(image: str) -> bool:
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    return inspect.returncode == 0


def chosen_images() -> dict[str, str]:
    """The images this run gives compose.yaml (an empty dict: the official defaults)."""
    if any(os.environ.get(name) for name in IMAGE_VARIABLES):
        return {name: os.environ[name] for name in IMAGE_VARIABLES if os.environ.get(name)}
    local = local_images()
    return local if all(image_exists(image) for image in local.values()) else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``check`` once a second until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def amqp_answers(port: int) -> bool:
    """The broker speaks AMQP on the port (docker-proxy accepts TCP before it listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(8)[:1] == b"\x01"
    except OSError:
        return False


@dataclass
class Stack:
    """A compose project started from compose.yaml."""

    project: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "--ansi", "never", "-f", str(REPO / "compose.yaml")]
        return subprocess.run(
            [*argv, "-p", self.project, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def containers(self) -> dict[str, dict[str, Any]]:
        """docker inspect of each of the project's containers, by service."""
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not ids:
            return {}
        found = subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=True
        ).stdout
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in json.loads(found)}

    def exec(self, service: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *argv, timeout=60)

    def url(self, port_variable: str, path: str) -> str:
        return f"http://127.0.0.1:{self.env[port_variable]}{path}"

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40").stdout


def health(container: dict[str, Any]) -> str:
    state = container["State"]
    return str(state.get("Health", {}).get("Status") or state["Status"])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed (Debian: apt-get install docker-compose)")
    if not _docker_answers():
        _unavailable("no Docker engine answers (bash containers/engine start)")
    ours = {k: v for k, v in os.environ.items() if k not in (*IMAGE_VARIABLES, *PORT_VARIABLES)}
    env = {
        **ours,
        **chosen_images(),
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_DOCKER_CLI_BUILD": "0",
        "PUBLISH_ADDRESS": "127.0.0.1",
        "RABBITMQ_PASSWORD": secrets.token_hex(12),
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        **{name: str(free_port()) for name in PORT_VARIABLES},
    }
    running = Stack(f"exitpipe-test-{uuid.uuid4().hex[:8]}", env)
    try:
        built = running.compose("build", timeout=900)
        hint = "" if chosen_images() else " (no registry? `bash containers/build` first)"
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:] + hint
        up = running.compose("up", "-d", timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        yield running
    finally:
        running.compose("down", "-v", "--remove-orphans", "-t", "30", timeout=180)


@pytest.fixture(scope="module")
def healthy(stack: Stack) -> dict[str, dict[str, Any]]:
    """The stack once topology has exited 0 and the others report healthy."""

    def ready() -> dict[str, dict[str, Any]] | None:
        found = stack.containers()
        topology = found.get("topology", {}).get("State", {})
        if topology.get("Status") == "exited" and topology.get("ExitCode") != 0:
            raise AssertionError(f"topology exited {topology['ExitCode']}:\n{stack.logs()}")
        others = ("rabbitmq", "postgres", "classifier", "job-state")
        done = topology.get("Status") == "exited"
        return (
            found
            if done and all(health(found.get(s, {"State": {}})) == "healthy" for s in others)
            else None
        )

    try:
        return poll(ready, 240, "the stack healthy")
    except AssertionError as error:
        states = {name: health(c) for name, c in stack.containers().items()}
        raise AssertionError(f"{error}: {states}\n{stack.logs()}") from None


def test_stack_comes_up_healthy_unprivileged_and_on_loopback_only(
    stack: Stack, healthy: dict[str, dict[str, Any]]
) -> None:
    assert set(healthy) == {"rabbitmq", "postgres", "topology", "classifier", "job-state"}
    assert healthy["topology"]["State"]["ExitCode"] == 0
    for service in ("topology", "classifier", "job-state"):
        container = healthy[service]
        assert container["Config"]["User"] == "10001:10001", service
        assert container["HostConfig"]["Init"] is True, service
    uid = stack.exec("job-state", "id", "-u")
    assert uid.returncode == 0 and uid.stdout.strip() == "10001", uid
    for name, container in healthy.items():
        for bindings in (container["HostConfig"]["PortBindings"] or {}).values():
            assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, name
    for name in ("rabbitmq", "postgres"):
        wanted = stack.env.get(f"{name.upper()}_IMAGE")
        if wanted:
            assert healthy[name]["Config"]["Image"] == wanted
    for variable in ("CLASSIFIER_METRICS_PORT", "JOB_STATE_METRICS_PORT"):
        with urllib.request.urlopen(stack.url(variable, "/healthz"), timeout=5) as reply:
            assert reply.status == 200
    encoding = stack.exec(
        "postgres", "psql", "-U", "exitpipe", "-d", "exitpipe", "-Atc", "SHOW server_encoding"
    )
    assert encoding.stdout.strip() == "UTF8", encoding


def test_an_exit_reported_from_the_host_reaches_postgresql(
    stack: Stack, healthy: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    port = int(stack.env["RABBITMQ_PORT"])
    poll(lambda: amqp_answers(port), 60, "AMQP on the published port")
    client = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    client |= {
        "EXITPIPE_AMQP_URL": f"amqp://exitpipe:{stack.env['RABBITMQ_PASSWORD']}@127.0.0.1:{port}/%2F",
        "EXITPIPE_NAMESPACE": "exitpipe",
        "EXITPIPE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    job = f"compose-{uuid.uuid4().hex[:8]}"
    report = subprocess.run(
        [str(EXITPIPE), "report", "--job", job, "--site", "site-1", "--code", "EXCEPTION"],
        env=client,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert report.returncode == 0, report.stderr
    event_id = report.stdout.strip()

    def shown() -> dict[str, Any] | None:
        result = stack.exec("job-state", "exitpipe", "jobs", "show", job, "--json")
        view: dict[str, Any] | None = json.loads(result.stdout) if result.returncode == 0 else None
        return view if view and view["status"] == "FINISHED:EXECUTION_EXCEPTION" else None

    view = poll(shown, 60, "the job in `jobs show` inside job-state")
    [row] = view["history"]
    assert (row["event_id"], row["code"], row["outcome"]) == (event_id, "EXCEPTION", "applied")

    query = f"SELECT status FROM jobs WHERE job_id = '{job}'"
    stored = stack.exec("postgres", "psql", "-U", "exitpipe", "-d", "exitpipe", "-Atc", query)
    assert stored.stdout.strip() == "FINISHED:EXECUTION_EXCEPTION", stored
    with urllib.request.urlopen(stack.url("JOB_STATE_METRICS_PORT", "/metrics"), timeout=5) as r:
        metrics = r.read().decode()
    assert re.search(r'exitpipe_events_total\{daemon="job-state"[^}]*\} 1\.0', metrics)


def test_the_stack_stops_cleanly_within_seconds(
    stack: Stack, healthy: dict[str, dict[str, Any]]
) -> None:
    started = time.monotonic()
    stopped = stack.compose("stop", "-t", "30", timeout=180)
    stop_seconds = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stderr
    states = {name: c["State"] for name, c in stack.containers().items()}
    for service in ("classifier", "job-state"):
        assert states[service]["ExitCode"] == 0, (service, states[service], stack.logs())
    assert stop_seconds < 20, f"stop took {stop_seconds:.1f} s"
    started = time.monotonic()
    down = stack.compose("down", "-v", "--remove-orphans", "-t", "30", timeout=180)
    assert down.returncode == 0, down.stderr
    assert time.monotonic() - started < 20, "down took too long"
    assert stack.containers() == {}
    volumes = subprocess.run(
        [
            "docker",
            "volume",
            "ls",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={stack.project}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert volumes.stdout.split() == []
