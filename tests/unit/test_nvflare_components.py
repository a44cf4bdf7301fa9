"""The FLARE components and ``exitpipe nvflare install``, without a FLARE deployment.

The install command is tested on fake site folders and needs no ``nvflare``. The components
are driven with in-memory fakes of the few FLARE objects they read (the executor's worker
table, the server engine, the job store); they need the ``nvflare`` package, which the
``nvflare`` extra installs (under CI=true its absence is a failure, not a skip).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from exitpipe.cli import main
from exitpipe.commands import nvflare as command
from exitpipe.settings import Settings
from schemas.codes import Code, Stage
from schemas.events import ExitEvent, LifecycleEvent

FLARE_LAUNCHER = command.FLARE_LAUNCHER


# -- exitpipe nvflare install ----------------------------------------------------------------


def _resources(launcher: str = FLARE_LAUNCHER) -> dict[str, Any]:
    return {
        "format_version": 2,
        "components": [
            {"id": "resource_manager", "path": "x.GPUResourceManager", "args": {"num_of_gpus": 0}},
            {"id": "process_launcher", "path": launcher, "args": {}},
        ],
    }


def _site(root: Path, role: str = "client", launcher: str = FLARE_LAUNCHER) -> Path:
    (root / "startup").mkdir(parents=True)
    (root / "local").mkdir()
    (root / "startup" / f"fed_{role}.json").write_text("{}")
    default = root / "local" / "resources.json.default"
    default.write_text(json.dumps(_resources(launcher), indent=2))
    if role == "server":  # POC writes the server's resources.json itself
        (root / "local" / "resources.json").write_text(default.read_text())
    return root


def _components(site: Path) -> list[dict[str, Any]]:
    return json.loads((site / "local" / "resources.json").read_text())["components"]  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _no_exitpipe_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("EXITPIPE_"):
            monkeypatch.delenv(key)


def test_client_launcher_is_replaced_not_added(tmp_path: Path) -> None:
    site = _site(tmp_path / "site-1")
    assert main(["nvflare", "install", str(site), "--namespace", "ns-1"]) == 0
    launchers = [c for c in _components(site) if c["id"] == "process_launcher"]
    assert launchers == [
        {
            "id": "process_launcher",
            "path": "producers.nvflare.ClientProcessJobLauncher",
            "args": {"namespace": "ns-1"},
        }
    ]
    assert len(_components(site)) == 2  # FLARE refuses a second launcher
    original = site / "local" / "resources.json.orig"
    assert json.loads(original.read_text()) == _resources()


def test_installing_twice_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(tmp_path / "site-1")
    server = _site(tmp_path / "server", "server")
    argv = ["nvflare", "install", str(site), str(server), "--namespace", "ns-1"]
    assert main(argv) == 0
    files = [site / "local" / "resources.json", server / "local" / "resources.json"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    origs = [f.with_name("resources.json.orig").read_bytes() for f in files]
    capsys.readouterr()
    assert main(argv) == 0
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    assert [f.with_name("resources.json.orig").read_bytes() for f in files] == origs
    assert capsys.readouterr().out.count("already installed, nothing changed") == 2


def test_server_gets_one_reporter(tmp_path: Path) -> None:
    server = _site(tmp_path / "server", "server")
    assert main(["nvflare", "install", str(server)]) == 0
    assert main(["nvflare", "install", str(server), "--retry-seconds", "5"]) == 0
    reporters = [c for c in _components(server) if c["path"].startswith("producers.")]
    assert reporters == [
        {
            "id": "exitpipe_lifecycle",
            "path": "producers.nvflare.LifecycleReporter",
            "args": {"retry_seconds": 5.0},
        }
    ]
    launchers = [c for c in _components(server) if c["id"] == "process_launcher"]
    assert launchers[0]["path"] == FLARE_LAUNCHER  # the server's own launcher is left alone
    original = json.loads((server / "local" / "resources.json.orig").read_text())
    assert original == _resources()  # the original, not the first install's result


def test_environment_and_passwords_stay_out_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXITPIPE_AMQP_URL", "amqp://site:from-env@broker/%2F")
    monkeypatch.setenv("EXITPIPE_NAMESPACE", "env-ns")
    site = _site(tmp_path / "site-1")
    assert main(["nvflare", "install", str(site)]) == 0
    resources = site / "local" / "resources.json"
    assert "from-env" not in resources.read_text() and "env-ns" not in resources.read_text()
    assert _components(site)[1]["args"] == {}

    assert main(["nvflare", "install", str(site), "--amqp-url", "amqp://u:s3cret@b/%2F"]) == 0
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err and "prefer EXITPIPE_AMQP_URL" in err
    assert _components(site)[1]["args"] == {"amqp_url": "amqp://u:s3cret@b/%2F"}
    assert resources.stat().st_mode & 0o077 == 0  # a password: readable by its owner only


def test_paths_are_written_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path / "site-1")
    monkeypatch.chdir(tmp_path)
    argv = ["nvflare", "install", str(site), "--spool-dir", "spool", "--ca-file", "ca.pem"]
    assert main([*argv, "--max-block-seconds", "1.5"]) == 0
    assert _components(site)[1]["args"] == {
        "spool_dir": str(tmp_path / "spool"),
        "ca_file": str(tmp_path / "ca.pem"),
        "max_block_seconds": 1.5,
    }


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda p: p.mkdir(), [], "has no local/ folder"),
        (lambda p: (p / "local").mkdir(parents=True), [], "no startup/fed_client.json"),
        (lambda p: _site(p, "client"), ["--server"], "is a FLARE client, not a server"),
        (lambda p: _site(p, launcher="x.K8sJobLauncher"), [], "replaces only FLARE's process"),
        (lambda p: _site(p), ["--store", "sqlite:///x.db"], "--store does not apply"),
        (lambda p: _site(p), ["--max-block-seconds", "0"], "must be above 0"),
    ],
)
def test_refusals_exit_2_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, extra: list[str], message: str
) -> None:
    root = tmp_path / "site"
    make(root)
    assert main(["nvflare", "install", str(root), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "local" / "resources.json").exists()


def test_unreadable_resources_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path / "site-1")
    (site / "local" / "resources.json").write_text("{not json")
    assert main(["nvflare", "install", str(site)]) == 2
    assert "cannot be read as JSON" in capsys.readouterr().err


# -- the components (need nvflare) -----------------------------------------------------------


@pytest.fixture(scope="module")
def flare() -> ModuleType:
    """producers.nvflare, which imports nvflare; a failure under CI, a skip elsewhere."""
    try:
        return importlib.import_module("producers.nvflare")
    except ImportError as exc:
        message = f"nvflare is not installed ({exc}): pip install -e '.[dev,nvflare]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_installed_paths_name_the_components(flare: ModuleType) -> None:
    from nvflare.apis.fl_component import FLComponent
    from nvflare.app_common.job_launcher.client_process_launcher import (
        ClientProcessJobLauncher as FlareLauncher,
    )

    for path, base in ((command.LAUNCHER, FlareLauncher), (command.REPORTER, FLComponent)):
        module, _, name = path.rpartition(".")
        assert module == flare.__name__ and issubclass(getattr(flare, name), base)
    assert f"{FlareLauncher.__module__}.{FlareLauncher.__name__}" == FLARE_LAUNCHER


def test_settings_defaults_match_exitpipe_settings(
    flare: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    ours, theirs = flare.ComponentSettings(), Settings()
    for name in flare.ComponentSettings.model_fields:
        assert getattr(ours, name) == getattr(theirs, name), name
    monkeypatch.setenv("EXITPIPE_NAMESPACE", "from-env")
    assert flare.ComponentSettings().namespace == "from-env"
    assert flare.ComponentSettings(namespace="from-args").namespace == "from-args"


# Cases of the lab's FLARE 2.9.0 runs: (real status, FLARE stage, abort requested, killed by
# FLARE, rc file) -> (code, stage, the RC FLARE reports).
STARTING, STARTED, STOPPED = 1, 2, 3
ENDS = [
    ((0, STARTED, False, False, None), (Code.SUCCESS, Stage.STARTED, 0)),
    ((103, STARTED, False, False, None), (Code.CONFIG_ERROR, Stage.STARTED, 101)),
    ((0, STARTED, True, False, None), (Code.ABORTED, Stage.STARTED, 0)),
    ((1, STARTED, False, False, None), (Code.EXECUTION_ERROR, Stage.STARTED, 101)),
    ((-9, STARTED, False, False, None), (Code.UNKNOWN, Stage.STARTED, 101)),
    ((103, STARTING, False, False, None), (Code.CONFIG_ERROR, Stage.STARTING, 104)),
    ((-9, STARTING, True, True, None), (Code.ABORTED, Stage.STARTING, 1)),
    ((-9, STARTED, True, True, None), (Code.ABORTED, Stage.STARTED, 1)),
    ((1, STOPPED, False, False, None), (Code.EXECUTION_ERROR, Stage.STARTED, 1)),
    ((102, STARTED, False, False, 102), (Code.UNSAFE_COMPONENT, Stage.STARTED, 102)),
    ((None, None, False, False, None), (Code.UNKNOWN, None, 127)),
]


@pytest.mark.parametrize(("seen", "expected"), ENDS)
def test_worker_end_mapping(
    flare: ModuleType, seen: tuple[Any, ...], expected: tuple[Any, ...]
) -> None:
    end = flare.WorkerEnd(*seen)
    assert (end.code, end.stage, end.flare_rc) == expected
    event = flare.exit_event("job-1", "site-1", end)
    assert isinstance(event, ExitEvent) and event.return_code == seen[0]
    assert f"FLARE reports RC {expected[2]} " in (event.reason or "")


class FakeCourier:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, str]] = []

    def send(self, event: Any, participant: str) -> None:
        self.sent.append((event, participant))


class FakeAdapter:
    def __init__(self, status: int) -> None:
        self.status = status
        self.exited = False
        self.killed = False

    def wait(self) -> None:
        self.exited = True

    def poll(self) -> int | None:
        return self.status if self.exited else None

    def terminate(self) -> None:
        self.killed = True


def _executor(job_id: str, status: int, abort: bool = False) -> SimpleNamespace:
    table = {job_id: {"_status": status, "_abort_requested": abort, "_job_launcher": None}}
    return SimpleNamespace(lock=threading.Lock(), run_processes=table)


def _handle(
    flare: ModuleType, adapter: FakeAdapter, executor: Any, run_dir: Path | None = None
) -> Any:
    worker = flare._Worker("job-1", "site-1", executor, run_dir)
    courier = FakeCourier()
    return flare.ReportingProcessHandle(adapter, worker, courier), courier


def test_handle_reports_once_with_real_status_and_stage(flare: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "_process_rc.txt").write_text("103\n")
    handle, courier = _handle(flare, FakeAdapter(103), _executor("job-1", STARTING), tmp_path)
    handle.wait()
    assert handle.poll() == 1  # FLARE's own mapping is unchanged
    [(event, participant)] = courier.sent
    assert participant == "site-1"
    assert (event.job_id, event.site, event.return_code) == ("job-1", "site-1", 103)
    assert (event.code, event.stage) == (Code.CONFIG_ERROR, Stage.STARTING)
    assert "wrote 103 to _process_rc.txt" in event.reason
    assert (tmp_path / "_process_rc.txt").exists()  # left for FLARE to read and delete


def test_handle_killed_by_flare_is_aborted(flare: ModuleType) -> None:
    adapter = FakeAdapter(-9)
    handle, courier = _handle(flare, adapter, _executor("job-1", STARTED, abort=True))
    handle.terminate()
    handle.wait()
    [(event, _)] = courier.sent
    assert adapter.killed and (event.code, event.return_code) == (Code.ABORTED, -9)
    assert "terminated by FLARE" in event.reason


def test_handle_without_flare_internals_still_reports(flare: ModuleType) -> None:
    before = flare.failures().get("flare_internals", 0)
    handle, courier = _handle(flare, FakeAdapter(0), object())
    handle.wait()
    [(event, _)] = courier.sent
    assert event.stage is None and event.code is Code.SUCCESS
    assert flare.failures()["flare_internals"] == before + 1


def test_handle_never_raises_on_a_bad_job_id(flare: ModuleType) -> None:
    before = flare.failures().get("invalid_event", 0)
    worker = flare._Worker("not a job id", "site-1", _executor("x", STARTED), None)
    courier = FakeCourier()
    handle = flare.ReportingProcessHandle(FakeAdapter(0), worker, courier)
    handle.wait()
    assert courier.sent == [] and flare.failures()["invalid_event"] == before + 1


def test_bad_settings_disable_reporting_not_the_launcher(flare: ModuleType) -> None:
    before = flare.failures().get("settings", 0)
    launcher = flare.ClientProcessJobLauncher(amqp_url="http://nope")
    assert launcher._courier is None and flare.failures()["settings"] == before + 1


@pytest.fixture
def unreachable(flare: ModuleType, tmp_path: Path) -> Iterator[Any]:
    settings = flare.ComponentSettings(
        amqp_url="amqp://site:s3cret@127.0.0.1:1/%2F", spool_dir=tmp_path, retry_seconds=0.3
    )
    yield flare.Courier(settings, block_seconds=2.0, own_spool=False)


def test_unreachable_broker_spools_per_site_and_never_logs_passwords(
    flare: ModuleType, unreachable: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    end = flare.WorkerEnd(1, STARTED)
    event = flare.exit_event("job-1", "site-1", end)
    started = time.monotonic()
    unreachable.send(event, "site-1")
    assert time.monotonic() - started < 2.5
    spooled = unreachable.spool_for("site-1").pending()
    assert [m.message_id for _, m in spooled] == [str(event.event_id)]
    assert unreachable.spool_for("site-1").directory == tmp_path / "nvflare-site-1"
    assert "s3cret" not in caplog.text


def test_a_hung_delivery_holds_flare_only_block_seconds(
    flare: ModuleType, unreachable: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    monkeypatch.setattr(unreachable, "_deliver_or_keep", lambda *a: release.wait(10))
    unreachable.block_seconds = 0.3
    before = flare.failures().get("slow", 0)
    started = time.monotonic()
    unreachable.send(flare.exit_event("job-1", "site-1", flare.WorkerEnd(0, STARTED)), "site-1")
    assert time.monotonic() - started < 1.0
    assert flare.failures()["slow"] == before + 1
    release.set()


# -- the lifecycle reporter ------------------------------------------------------------------


class FakeEngine:
    def __init__(self, meta: dict[str, Any], participants: list[str]) -> None:
        self.meta = meta
        clients = {str(uuid.uuid4()): SimpleNamespace(name=n) for n in participants}
        self.run_processes = {"job-1": {"_participants": clients}} if participants else {}

    def get_component(self, name: str) -> Any:
        assert name == "job_manager"
        return SimpleNamespace(get_job=lambda job_id, ctx: SimpleNamespace(meta=dict(self.meta)))

    def get_clients(self) -> list[Any]:
        return [SimpleNamespace(name="site-1"), SimpleNamespace(name="site-2")]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def get_prop(self, key: str, default: Any = None) -> Any:
        return {"job_id": "job-1"} if key == "__event_data__" else default

    def get_engine(self) -> FakeEngine:
        return self.engine

    def get_identity_name(self, default: str = "") -> str:
        return "server"


def _reporter(flare: ModuleType) -> tuple[Any, FakeCourier]:
    reporter = flare.LifecycleReporter()
    courier = FakeCourier()
    reporter._courier = courier
    return reporter, courier


def test_reporter_publishes_running_with_sites_and_one_verdict(flare: ModuleType) -> None:
    from nvflare.apis.event_type import EventType

    reporter, courier = _reporter(flare)
    running = FakeContext(FakeEngine({"status": "DISPATCHED"}, ["site-2", "site-1"]))
    reporter.handle_event(EventType.JOB_STARTED, running)
    ended = FakeContext(FakeEngine({"status": "FINISHED:ABORTED"}, ["site-1", "site-2"]))
    reporter.handle_event(EventType.JOB_ABORTED, ended)
    reporter.handle_event(EventType.JOB_COMPLETED, ended)  # FLARE fires both for an abort
    events = [event for event, _ in courier.sent]
    assert all(isinstance(e, LifecycleEvent) for e in events)
    assert [(e.status.value, e.sites) for e in events] == [
        ("RUNNING", ["site-1", "site-2"]),
        ("FINISHED:ABORTED", ["site-1", "site-2"]),
    ]
    assert {participant for _, participant in courier.sent} == {"server"}


@pytest.mark.parametrize(
    ("deploy_map", "sites"),
    [
        ({"app": ["@ALL"]}, ["site-1", "site-2"]),
        (
            {"app_server": ["server"], "app_bad": ["site-1"], "app_good": ["site-2"]},
            ["site-1", "site-2"],
        ),
        ({"app": [{"sites": ["site-9"]}]}, ["site-9"]),
        ({}, None),
    ],
)
def test_reporter_falls_back_to_the_deploy_map(
    flare: ModuleType, deploy_map: dict[str, Any], sites: list[str] | None
) -> None:
    from nvflare.apis.event_type import EventType

    reporter, courier = _reporter(flare)
    meta = {"status": "FINISHED:COMPLETED", "deploy_map": deploy_map}
    reporter.handle_event(EventType.JOB_COMPLETED, FakeContext(FakeEngine(meta, [])))
    [(event, _)] = courier.sent
    assert event.sites == sites


def test_reporter_never_raises(flare: ModuleType) -> None:
    from nvflare.apis.event_type import EventType

    reporter, courier = _reporter(flare)
    before = flare.failures()
    weird = FakeContext(FakeEngine({"status": "FINISHED:SOMETHING_NEW"}, ["site-1"]))
    reporter.handle_event(EventType.JOB_COMPLETED, weird)
    broken = FakeContext(FakeEngine({}, []))
    broken.engine.get_component = None  # type: ignore[assignment,method-assign]
    reporter.handle_event(EventType.JOB_STARTED, broken)
    reporter.handle_event("_some_other_event", broken)
    after = flare.failures()
    assert courier.sent == []
    assert after["invalid_event"] == before.get("invalid_event", 0) + 1
    assert after["error"] == before.get("error", 0) + 1
