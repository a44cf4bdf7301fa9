"""The topology on a cluster: quorum queues with one replica per node (at most 3), and
``topology --check`` naming each replicated queue's members and leader."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.cluster.harness import Cluster
from tests.conftest import delete_namespace
from tests.faults.harness import RABBIT_BIN, daemon_env

pytestmark = pytest.mark.cluster


def exitpipe(cluster: Cluster, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``exitpipe ARGV`` with the cookie and CLI settings of the cluster's first node."""
    node = cluster.node(1)
    ctl_env = {k: v for k, v in node.env.items() if k == "HOME" or k.startswith("RABBITMQ_CTL")}
    return subprocess.run(
        [sys.executable, "-m", "exitpipe.cli", *argv],
        env={**daemon_env(cluster.urls(2, 3, 1), "unused", "memory://"), **ctl_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_topology_on_three_nodes_and_its_check(cluster: Cluster) -> None:
    ns = f"t-{uuid.uuid4().hex[:10]}"
    ctl = ["--rabbitmqctl", str(RABBIT_BIN / "rabbitmqctl"), "-n", cluster.node(1).name]
    try:
        declared = exitpipe(cluster, "topology", EXITPIPE_NAMESPACE=ns)
        assert declared.returncode == 0, declared.stderr
        assert "guest:guest" not in declared.stdout + declared.stderr
        checked = exitpipe(cluster, "topology", "--check", *ctl, EXITPIPE_NAMESPACE=ns)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        lines = checked.stdout.splitlines()
        leader = cluster.node(2).name  # declared through the first URL: node 2
        members = ", ".join(sorted(n.name for n in cluster.nodes))
        for queue in ("classify", "job-state", "dead-letters"):
            (line,) = [x for x in lines if x.startswith(f"queue {ns}.{queue} (quorum)")]
            assert f"leader {leader};" in line, line
            assert ", ".join(sorted(line.split("members ")[1].split(", "))) == members, line

        fewer = exitpipe(
            cluster, "topology", "--check", *ctl, EXITPIPE_NAMESPACE=ns, EXITPIPE_QUORUM_SIZE="2"
        )
        assert fewer.returncode == 1, fewer.stdout  # declared differently: 3, not 2
        assert "x-quorum-initial-group-size" in fewer.stdout, fewer.stdout
    finally:
        delete_namespace(cluster.urls(), ns)
