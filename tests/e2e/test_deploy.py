"""The deployment files, checked without a Docker engine.

compose.yaml is validated by a real compose implementation (Debian's ``docker-compose``), and its
daemons are started here exactly as it writes them: the image's entrypoint, the service's
command and ``EXITPIPE_*`` environment, with only the broker, namespace, store and metrics port
pointed at this test's own. The Dockerfile is read for what makes an image small and safe, and
its build context is turned into the wheel the builder stage would install.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.support.pipeline import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAEMONS = ("classifier", "job-state")


# -- reading the files ---------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM block of a Dockerfile: its base image, its name and its instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for line in self.args("ENV") for item in shlex.split(line))
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def read_dockerfile(path: Path = REPO / "Dockerfile") -> list[Stage]:
    """The stages, with global ARG defaults substituted into FROM."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(base, words[2] if named else None))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def image_entrypoint() -> tuple[list[str], list[str]]:
    """The final image's ENTRYPOINT and CMD (exec form)."""
    final = read_dockerfile()[-1]
    return json.loads(final.args("ENTRYPOINT")[-1]), json.loads(final.args("CMD")[-1])


def docker_compose() -> str:
    """The docker-compose binary: skipped on a laptop without it, a failure in CI."""
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is not installed (Debian: apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI must validate compose.yaml (.ci/run installs it)")
        pytest.skip(message)
    return found


# What compose.yaml takes from the environment besides the passwords (README, "Containers").
COMPOSE_VARIABLES = (
    "PYTHON_IMAGE",
    "RABBITMQ_IMAGE",
    "POSTGRES_IMAGE",
    "EXITPIPE_IMAGE",
    "PUBLISH_ADDRESS",
    "RABBITMQ_PORT",
    "RABBITMQ_UI_PORT",
    "CLASSIFIER_METRICS_PORT",
    "JOB_STATE_METRICS_PORT",
)


def compose_config(**variables: str) -> dict[str, Any]:
    """compose.yaml as the compose implementation resolves it (anchors, interpolation), with
    only ``variables`` set of those it reads."""
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    result = subprocess.run(
        [docker_compose(), "-f", str(REPO / "compose.yaml"), "config"],
        cwd=REPO,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml with its defaults."""
    return compose_config()


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port the service publishes, whichever
    syntax the compose implementation prints (``ADDRESS:PORT:PORT/tcp`` with an address)."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["published"]), str(port["target"])))
        else:
            *address, published, target = str(port).split("/")[0].split(":")
            found.append((":".join(address), published, target))
    return found


def exitpipe_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the project's Dockerfile."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def command_line(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint + command, with ``exitpipe`` from this venv."""
    entrypoint, cmd = image_entrypoint()
    argv = [*(service.get("entrypoint") or entrypoint), *(service.get("command") or cmd)]
    resolved = shutil.which(argv[0], path=str(BIN)) or shutil.which(argv[0])
    assert resolved, f"{argv[0]} is not installed here"
    return [resolved, *argv[1:]]


def container_env(service: dict[str, Any], **overrides: str) -> dict[str, str]:
    """The image's and the service's EXITPIPE_* variables over a clean copy of ours."""
    ours = {k: v for k, v in os.environ.items() if not k.startswith("EXITPIPE_")}
    image = {k: v for k, v in read_dockerfile()[-1].env().items() if k.startswith("EXITPIPE_")}
    written = {k: str(v) for k, v in service.get("environment", {}).items()}
    return {**ours, **image, **written, **overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- compose.yaml ----------------------------------------------------------------------------


def test_compose_file_is_valid(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"rabbitmq", "postgres", "topology", *DAEMONS}
    assert set(exitpipe_services(compose)) == {"topology", *DAEMONS}


def test_compose_brokers_are_official_images_with_health_checks(compose: dict[str, Any]) -> None:
    rabbit, pg = compose["services"]["rabbitmq"], compose["services"]["postgres"]
    assert rabbit["image"] == "rabbitmq:3.10-management"
    assert rabbit["healthcheck"]["test"][-3:] == ["rabbitmq-diagnostics", "-q", "ping"]
    mounts = dict(v.split(":")[1::-1] for v in rabbit["volumes"] if v.startswith("/"))
    plugins = Path(mounts["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert {"rabbitmq_management", "rabbitmq_stream"} <= set(re.findall(r"\w+", plugins))
    assert pg["image"] == "postgres:15"
    assert "pg_isready" in pg["healthcheck"]["test"]
    named = [v.split(":")[0] for v in pg["volumes"]]
    assert any(name in compose["volumes"] for name in named), "postgres data needs a volume"


def test_compose_daemons_are_run_like_services(compose: dict[str, Any]) -> None:
    services = exitpipe_services(compose)
    expose = read_dockerfile()[-1].args("EXPOSE")
    for name in DAEMONS:
        s = services[name]
        env = s["environment"]
        assert all(key.startswith("EXITPIPE_") for key in env), f"{name}: {env}"
        assert env["EXITPIPE_LOG_FORMAT"] == "json"
        assert s["restart"] == "unless-stopped"
        assert s["stop_signal"] == "SIGTERM" and s["stop_grace_period"]
        assert s["init"] is True, "PID 1 must be an init that passes signals on"
        assert s["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert s["depends_on"]["topology"]["condition"] == "service_completed_successfully"
        assert [p[2] for p in published_ports(s)] == [env["EXITPIPE_METRICS_PORT"]]
        assert env["EXITPIPE_METRICS_PORT"] in expose
        assert "/healthz" in " ".join(s["healthcheck"]["test"])
    assert services["job-state"]["environment"]["EXITPIPE_STORE"].startswith("postgresql://")
    assert services["job-state"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["topology"]["restart"] == "no"
    assert services["topology"]["command"] == ["topology"]


def test_compose_takes_images_and_published_addresses_from_variables(
    compose: dict[str, Any],
) -> None:
    for service in exitpipe_services(compose).values():
        assert service["build"]["args"] == {"PYTHON_IMAGE": read_dockerfile()[0].base}
        assert service["image"] == "exitpipe:latest"
    published = [p for s in compose["services"].values() for p in published_ports(s)]
    assert {p[1] for p in published} == {"5672", "15672", "9101", "9102"}
    local = dict(
        line.split("=", 1)
        for line in (REPO / "containers" / "images.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(local) == {"PYTHON_IMAGE", "RABBITMQ_IMAGE", "POSTGRES_IMAGE"}
    ports = {"RABBITMQ_PORT": "25999", "RABBITMQ_UI_PORT": "25998"}
    ports |= {"CLASSIFIER_METRICS_PORT": "25997", "JOB_STATE_METRICS_PORT": "25996"}
    moved = compose_config(**local, **ports, PUBLISH_ADDRESS="127.0.0.1")
    services = moved["services"]
    assert services["rabbitmq"]["image"] == local["RABBITMQ_IMAGE"]
    assert services["postgres"]["image"] == local["POSTGRES_IMAGE"]
    for service in exitpipe_services(moved).values():
        assert service["build"]["args"]["PYTHON_IMAGE"] == local["PYTHON_IMAGE"]
    published = [p for s in services.values() for p in published_ports(s)]
    assert {p[0] for p in published} == {"127.0.0.1"}
    assert {p[1] for p in published} == set(ports.values())


@dataclass
class Daemon:
    """A daemon started from its compose service, with its log and environment."""

    name: str
    service: dict[str, Any]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]

    def healthcheck(self) -> bool:
        """Run the service's own healthcheck command here."""
        test = self.service["healthcheck"]["test"]
        assert test[0] == "CMD", test
        argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
        return subprocess.run(argv, env=self.env, capture_output=True, timeout=10).returncode == 0

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.env['EXITPIPE_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
            return text

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(name: str, service: dict[str, Any], **overrides: str) -> Daemon:
        env = container_env(service, EXITPIPE_METRICS_PORT=str(free_port()), **overrides)
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(
            command_line(service), env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb")
        )
        started.append(Daemon(name, service, env, log, process))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.e2e
def test_compose_daemons_as_written_carry_an_exit_to_the_store(
    compose: dict[str, Any],
    amqp_url: str,
    namespace: str,
    pg_store_url: str,
    start_daemon: Any,
    tmp_path: Path,
) -> None:
    services = exitpipe_services(compose)
    here = {"EXITPIPE_AMQP_URL": amqp_url, "EXITPIPE_NAMESPACE": namespace}
    topology = run(command_line(services["topology"]), container_env(services["topology"], **here))
    assert topology.returncode == 0, topology.stderr

    classifier = start_daemon("classifier", services["classifier"], **here)
    job_state = start_daemon(
        "job-state", services["job-state"], **here, EXITPIPE_STORE=pg_store_url
    )
    for daemon in (classifier, job_state):
        wait_until(daemon.healthcheck, timeout=30)

    exitpipe = command_line(services["topology"])[0]
    client = {**container_env({}), **here, "EXITPIPE_SPOOL_DIR": str(tmp_path / "spool")}
    client.pop("EXITPIPE_METRICS_PORT", None)
    job = f"deploy-{uuid.uuid4().hex[:8]}"
    report = run(
        [exitpipe, "report", "--job", job, "--site", "site-1", "--code", "EXCEPTION"], client
    )
    assert report.returncode == 0, report.stderr
    event_id = report.stdout.strip()

    def failed_job() -> dict[str, Any] | None:
        result = run([exitpipe, "jobs", "show", job, "--json"], job_state.env)
        view = json.loads(result.stdout) if result.returncode == 0 else None
        return view if view and view["status"] == "FINISHED:EXECUTION_EXCEPTION" else None

    job_view = wait_until(failed_job, timeout=30)
    assert job_view is not None
    [row] = job_view["history"]
    assert (row["event_id"], row["code"], row["outcome"]) == (event_id, "EXCEPTION", "applied")
    assert re.search(r'exitpipe_events_total\{daemon="job-state"[^}]*\} 1\.0', job_state.metrics())
    assert re.search(r'exitpipe_broker_connected\{daemon="classifier"\} 1\.0', classifier.metrics())

    for daemon in (classifier, job_state):
        assert daemon.stop() == 0, daemon.log.read_text()
        lines = daemon.log.read_text().splitlines()
        assert lines and all(json.loads(line) for line in lines), "EXITPIPE_LOG_FORMAT=json"


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_final_stage_is_slim_unprivileged_and_only_gets_the_install() -> None:
    stages = read_dockerfile()
    builder, final = stages[0], stages[-1]
    assert len(stages) >= 2 and builder.name
    for stage in (builder, final):
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", stage.base), stage.base
    user = final.args("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert image_entrypoint()[0] == ["exitpipe"]
    assert final.args("STOPSIGNAL") == ["SIGTERM"]
    copies = final.args("COPY") + final.args("ADD")
    sources = {c.split()[-2] for c in copies}
    assert all(f"--from={builder.name}" in c.split() for c in copies), copies
    assert len(sources) == 1, f"only the installed environment, not {sources}"
    [venv] = sources
    assert f"{venv}/bin" in final.env()["PATH"].split(":")
    for command in final.args("RUN"):
        assert not re.search(r"\b(apt-get|apk|pip|gcc|make|build-essential)\b", command)
    assert any("pip wheel" in r for r in builder.args("RUN")), "the builder makes a wheel"


def test_image_command_lines_run_here(compose: dict[str, Any]) -> None:
    entrypoint, cmd = image_entrypoint()
    lines = [[*entrypoint, "--help"], [*entrypoint, *cmd, "--help"]]
    lines += [[*entrypoint, *s["command"], "--help"] for s in exitpipe_services(compose).values()]
    for argv in lines:
        argv[0] = shutil.which(argv[0], path=str(BIN)) or argv[0]
        result = run(argv, dict(os.environ))
        assert result.returncode == 0 and "usage: exitpipe" in result.stdout, (argv, result)


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, in order (the last match wins)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip("/")
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", line)
        glob = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        rules.append((negated, re.compile("".join(glob.get(p, re.escape(p)) for p in parts))))
    return rules


def build_context() -> set[str]:
    """The files `docker build .` sends: a path is out when it or a parent matches last."""
    rules = _dockerignore()

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        out = False
        for negated, pattern in rules:
            if any(pattern.fullmatch(p) for p in prefixes):
                out = not negated
        return out

    files = set()
    for root, dirs, names in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if d != ".git" and not (ignored(rel + d) and d.startswith("."))]
        files |= {rel + n for n in names if not ignored(rel + n)}
    return files


def test_build_context_makes_the_wheel_the_image_installs(tmp_path: Path) -> None:
    context = build_context()
    assert {"pyproject.toml", "README.md"} <= context
    assert not any(f.startswith(("tests/", ".venv/", ".git/")) for f in context)
    src = tmp_path / "src"
    for line in read_dockerfile()[0].args("COPY"):  # the builder's COPYs, WORKDIR /src
        *sources, dest = shlex.split(line)
        for source in sources:
            inside = [f for f in context if f == source or f.startswith(source + "/")]
            assert inside, f"COPY {source}: not in the build context"
            for f in inside:
                target = (
                    src / dest / Path(f).name if f == source else src / dest / f[len(source) + 1 :]
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / f, target)
    wheels = tmp_path / "wheels"
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(src),
        ],
        dict(os.environ),
    )
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("exitpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = [
        d.name
        for d in REPO.iterdir()
        if (d / "__init__.py").exists() and any(d.match(p) for p in find["find"]["include"])
    ]
    expected = {
        p.relative_to(REPO).as_posix()
        for pkg in packages
        for p in (REPO / pkg).rglob("*")
        if p.suffix == ".py" or (pkg == "schemas" and p.suffix == ".json")
    }
    assert expected - names == set(), "files the image would lack"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "exitpipe = exitpipe.cli:console" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- systemd units ---------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", DAEMONS)
def test_systemd_unit_runs_the_daemon_like_compose(
    daemon: str, compose: dict[str, Any], tmp_path: Path
) -> None:
    path = REPO / "deploy" / f"exitpipe-{daemon}.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(path)
    service = unit["Service"]
    assert service["EnvironmentFile"] and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 0
    assert service["User"] not in ("root", "0")
    assert shlex.split(service["ExecStart"])[1:] == compose["services"][daemon]["command"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    exitpipe = shutil.which("exitpipe", path=str(BIN))
    assert exitpipe
    # The unit as written, but with the exitpipe of this venv, so verify can find it.
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/opt/exitpipe/bin/exitpipe", exitpipe))
    verified = run([analyze, "verify", str(copy)], dict(os.environ))
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
