"""The cluster harness: three private RabbitMQ nodes clustered on loopback, the faults done to
them, and what is measured (seconds until consuming resumes, events per second).

The nodes come from the installed ``rabbitmq-server``, as the fault suite's single node does
(``tests.faults.harness.RabbitNode``): their own node names, ports, data directories and Erlang
cookie, never the shared broker at 5672. They start in parallel and the second and third join
the first (``rabbitmqctl join_cluster``). Two settings differ from a default node:

- ``net_ticktime`` of 5 s (Erlang's default is 60): a node that stops answering is declared
  down by its peers within about 6 s, so a pause of 10 s is a partition (Jepsen's pause
  nemesis: SIGSTOP, then SIGCONT);
- ``cluster_partition_handling = pause_minority``, the setting README recommends: a node cut
  off from the majority stops serving, so its clients fail over. A node that was frozen never
  saw itself in a minority, though: when it resumes, the partition stays recorded until its
  RabbitMQ application is restarted, which ``Cluster.heal`` does as an operator would (the
  RabbitMQ guide's recovery). ``autoheal`` would restart it by itself, but under load 3.10
  restarted the resumed node over and over, then waited a minute before trying again.

Every node's process group is recorded in its data directory; ``Cluster.shutdown`` kills them
all, and ``reap_stale`` kills those of an earlier run whose pytest process died before it
could (a crash, a kill -9), so a node never outlives its test run. With
``EXITPIPE_CLUSTER_KEEP`` set, the nodes' data and logs are left in place (under
``$TMPDIR/exitpipe-cluster-*``) to see what they did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.store.factory import open_store
from producers.publisher import Publisher
from schemas.events import Event
from tests.faults.harness import Checker, History, RabbitNode

SIZE = 3
NET_TICKTIME = 5
PARTITION_SECONDS = 10.0  # past the net tick time: the peers declare the node down
PREFIX = "exitpipe-cluster-"
_OWNER = "owner.pid"


def results_path() -> Path | None:
    """Where each measurement's JSON line is appended, when ``EXITPIPE_CLUSTER_RESULTS`` says."""
    path = os.environ.get("EXITPIPE_CLUSTER_RESULTS")
    return Path(path) if path else None


def record(line: dict[str, Any]) -> None:
    """Print one measurement as a JSON line, and append it to the results file if named."""
    text = json.dumps(line)
    print(text)
    path = results_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")


# -- the nodes ----------------------------------------------------------------------------------


class ClusterNode(RabbitNode):
    """One node of the private cluster: named ``exitpipe-c<N>-<pid>@localhost``."""

    def __init__(self, base: Path, number: int, cookie: str) -> None:
        super().__init__(base)
        self.number = number
        self.name = f"exitpipe-c{number}-{os.getpid()}@localhost"
        cookie_file = Path(self.env["HOME"]) / ".erlang.cookie"
        cookie_file.chmod(0o600)
        cookie_file.write_text(cookie)  # one cookie for the whole cluster
        cookie_file.chmod(0o400)
        (base / "rabbitmq.conf").write_text(
            "log.console = false\ncluster_partition_handling = pause_minority\n"
        )
        tick = f"-kernel net_ticktime {NET_TICKTIME}"
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        self.env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=f"{loopback} {tick}",
            RABBITMQ_CTL_ERL_ARGS=tick,  # the CLI's link to the node ticks at the same pace
        )
        self.paused = False

    def __str__(self) -> str:
        return f"c{self.number}"

    def launch(self) -> None:
        """Start the node's process group without waiting for it; recorded for ``reap_stale``."""
        super().launch()
        assert self.process is not None
        (self.base / "pgid").write_text(str(self.process.pid))
        self.paused = False

    def wait_started(self, timeout: float = 120) -> None:
        """Until the node serves AMQP (its listener opens last) and says it has booted."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self} exited: see {self.base / 'server.out'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self} did not start in {timeout}s")
            time.sleep(0.2)
        while True:  # the CLI may not reach a node that has only just opened its port
            left = int(max(5, deadline - time.monotonic()))
            done = self.ctl("await_startup", "--timeout", str(left), check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"node {self}: await_startup: {done.stderr or done.stdout}")
            time.sleep(1)

    def start(self, timeout: float = 120) -> None:
        self.launch()
        self.wait_started(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP the whole node: it neither answers nor closes anything (a partition)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL the node's process group (a stopped node too) and reap it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.paused = False


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class Cluster:
    """Three clustered nodes under ``base``; ``urls`` lists them in any order."""

    def __init__(self, base: Path) -> None:
        self.base = base
        (base / _OWNER).write_text(str(os.getpid()))
        cookie = uuid.uuid4().hex.upper()
        self.nodes = [ClusterNode(base / f"c{n}", n, cookie) for n in range(1, SIZE + 1)]

    def urls(self, *order: int) -> str:
        """A comma-separated URL list of the nodes, in ``order`` (node numbers, 1-based)."""
        return ",".join(self.node(n).url for n in order or range(1, SIZE + 1))

    def node(self, number: int) -> ClusterNode:
        return self.nodes[number - 1]

    def start(self) -> None:
        """Start the nodes in parallel, join the others to the first, wait for all three."""
        for node in self.nodes:
            node.launch()
        with ThreadPoolExecutor(SIZE) as pool:
            list(pool.map(lambda n: n.wait_started(), self.nodes))
        for node in self.nodes[1:]:  # one at a time: two nodes joining at once can race in mnesia
            self._join(node)
        self.wait_healthy()

    def _join(self, node: ClusterNode) -> None:
        node.ctl("stop_app")
        node.ctl("join_cluster", self.nodes[0].name)
        node.ctl("start_app")

    def running(self, via: ClusterNode) -> tuple[set[str], bool]:
        """(running node names, whether a partition is recorded) as ``via`` sees them."""
        done = via.ctl("cluster_status", "--formatter", "json", check=False, timeout=30)
        if done.returncode != 0:
            return set(), True
        status = json.loads(done.stdout)
        return set(status.get("running_nodes", [])), bool(status.get("partitions"))

    def healthy(self) -> bool:
        """Every node up, each seeing all three running and no partition."""
        names = {n.name for n in self.nodes}
        if not all(n.alive() and not n.paused for n in self.nodes):
            return False
        with ThreadPoolExecutor(SIZE) as pool:
            views = list(pool.map(self.running, self.nodes))
        return all(running == names and not partitioned for running, partitioned in views)

    def wait_healthy(self, timeout: float = 120) -> float:
        """Until ``healthy()``; seconds it took."""
        start = time.monotonic()
        while not self.healthy():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the cluster did not heal in {timeout}s")
            time.sleep(0.5)
        return time.monotonic() - start

    def heal(self, node: ClusterNode, wait: float = 3.0) -> tuple[float, bool]:
        """Resume a paused node; if the partition is still recorded after ``wait`` seconds,
        restart its RabbitMQ application. (seconds until healthy, whether it was restarted)."""
        start = time.monotonic()
        node.resume()
        with contextlib.suppress(TimeoutError):
            self.wait_healthy(wait)
            return time.monotonic() - start, False
        node.ctl("stop_app")
        node.ctl("start_app")
        self.wait_healthy()
        return time.monotonic() - start, True

    def repair(self) -> None:
        """Whatever a failed test left behind: resume a paused node, restart a dead one."""
        for node in self.nodes:
            node.resume()
            if not node.alive():
                node.start()
        self.wait_healthy()

    def leader(self, queue: str, vhost: str = "/") -> ClusterNode:
        """The node that leads ``queue`` now, as a running node reports it."""
        for via in self.nodes:
            if not via.alive() or via.paused:
                continue
            done = via.ctl(
                "list_queues", "-p", vhost, "--quiet", "--formatter", "json", "name", "leader",
                check=False,
            )  # fmt: skip
            if done.returncode == 0:
                rows = {r["name"]: r["leader"] for r in json.loads(done.stdout or "[]")}
                return next(n for n in self.nodes if n.name == rows[queue])
        raise RuntimeError(f"no running node could say who leads {queue}")

    def restart_later(self, node: ClusterNode) -> threading.Thread:
        """Restart a killed node in the background (it rejoins by itself)."""
        thread = threading.Thread(target=node.start, name=f"restart-{node}", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Kill every node (a stopped one too): nothing of the cluster outlives the suite."""
        for node in self.nodes:
            node.kill()


def reap_stale(tmp: Path | None = None) -> list[Path]:
    """Kill the nodes of earlier runs whose pytest process is gone; the directories reaped."""
    reaped = []
    for base in Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        owner = base / _OWNER
        if not owner.exists() or _alive(int(owner.read_text() or 0)):
            continue
        for pgid in base.glob("c*/pgid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pgid.read_text()), signal.SIGCONT)
                os.killpg(int(pgid.read_text()), signal.SIGKILL)
        reaped.append(base)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


# -- measuring: when consuming resumes -----------------------------------------------------------


@dataclass
class TimedHistory(History):
    """A history that also notes when each publish call began, and which ids it carried."""

    began: list[tuple[float, list[str]]] = field(default_factory=list)

    def publish(
        self, publisher: Publisher, events: Sequence[Event], *, twice: bool = False
    ) -> list[str]:
        self.began.append((time.time(), [str(e.event_id) for e in events]))
        return super().publish(publisher, events, twice=twice)

    def sent_after(self, moment: float) -> set[str]:
        """The ids first published after ``moment`` (wall clock)."""
        before = {i for t, ids in self.began if t <= moment for i in ids}
        return {i for t, ids in self.began if t > moment for i in ids} - before


def resumed_after(store_url: str, history: TimedHistory, fault: float) -> float | None:
    """Seconds from ``fault`` (wall clock) until the store recorded the first event that was
    published after it: an event that could only get there once consuming had resumed."""
    fresh = history.sent_after(fault)
    store = open_store(store_url)
    try:
        rows = [row for s in store.list() if (v := store.get(s.job_id)) for row in v.history]
    finally:
        store.close()
    times = [row.recorded_at.timestamp() for row in rows if row.event_id in fresh]
    return round(min(times) - fault, 2) if times else None


# -- checking a scenario --------------------------------------------------------------------------


@dataclass
class ClusterChecker(Checker):
    """The fault suite's checker (lost, duplicate effects, wrong final states: all zero), with
    the time until consuming resumed added to its JSON line, which goes to the cluster's file."""

    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, history: TimedHistory, fault: float, timeout: float = 120) -> dict[str, Any]:
        """``fault``: when it was done (wall clock)."""
        self._converge(None, timeout)
        line = self._count(None)
        line.pop("recover_s")  # the load goes on after the fault: resume_s is the measure
        line.update(resume_s=resumed_after(self.store_url, history, fault), **self.extra)
        record(line)
        assert line["lost"] == 0, self.details
        assert line["duplicate_effects"] == 0, self.details
        assert line["wrong_final_states"] == 0, self.details
        return line


# -- launchers: `exitpipe launch` through the faults ----------------------------------------------

LAUNCH_RCS = (101, 9, 103)  # EXCEPTION, ABORTED, CONFIG_ERROR: each one fails or stops its job
LAUNCH_SITE = "site-l"
SPOOLED = "kept in the spool"


@dataclass(frozen=True)
class Launch:
    """One `exitpipe launch` and how it went."""

    job: str
    rc: int  # the worker's
    status: int  # launch's own exit status
    seconds: float
    spooled: bool
    err: str


def launch(job: str, rc: int, env: dict[str, str], timeout: float = 120) -> Launch:
    """Run ``exitpipe launch`` for a worker that exits ``rc``."""
    argv = ["launch", "--job", job, "--site", LAUNCH_SITE, "--", "sh", "-c", f"exit {rc}"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = round(time.monotonic() - started, 2)
    err = f"[started {time.strftime('%H:%M:%S', time.localtime(time.time() - seconds))}] "
    return Launch(job, rc, done.returncode, seconds, SPOOLED in done.stderr, err + done.stderr)


class Launchers(threading.Thread):
    """Launches one worker after another, each reporting through a URL list of its own order,
    until stopped; the faults of the tests around it happen meanwhile."""

    def __init__(self, env: dict[str, str], url_lists: Sequence[str], pause: float = 0.3) -> None:
        super().__init__(name="launchers", daemon=True)
        self.env, self.url_lists, self.pause = env, list(url_lists), pause
        self.launches: list[Launch] = []
        self.faults: list[str] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        number = 0
        try:
            while not self._halt.is_set():
                urls = self.url_lists[number % len(self.url_lists)]
                env = {**self.env, "EXITPIPE_AMQP_URL": urls}
                rc = LAUNCH_RCS[number % len(LAUNCH_RCS)]
                self.launches.append(launch(f"launch-{number}", rc, env))
                number += 1
                self._halt.wait(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> list[Launch]:
        self._halt.set()
        self.join(180)
        assert not self.is_alive(), "a launch did not end"
        assert self.error is None, repr(self.error)
        return self.launches
