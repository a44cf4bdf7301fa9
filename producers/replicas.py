"""Where the replicated queues live: each queue's members and leader, read with rabbitmqctl.

AMQP 0-9-1 cannot tell which nodes hold a queue, so ``topology --check`` asks the node with
``rabbitmqctl list_queues name type leader members online`` (the CLI needs the node's Erlang
cookie: run it on a broker host, or as a user that has the cookie). ``report`` is pure: one
line per quorum queue or stream, and the problems among them (fewer members than the replicas
asked for, or no leader, which leaves a queue unable to take a message).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from producers.users import Rabbitmqctl
from schemas.topology import Topology

REPLICATED = ("quorum", "stream")


@dataclass(frozen=True)
class Replicas:
    """One queue's nodes as the broker reports them."""

    name: str
    kind: str
    leader: str | None
    members: tuple[str, ...]
    online: tuple[str, ...]


def read(ctl: Rabbitmqctl, vhost: str) -> dict[str, Replicas]:
    """Every queue of ``vhost`` with its leader and members (UsersError when the CLI fails)."""
    columns = ("name", "type", "leader", "members", "online")
    out = ctl.run("list_queues", "-p", vhost, "--quiet", "--formatter", "json", *columns)
    return {row["name"]: _replicas(row) for row in json.loads(out or "[]")}


def _replicas(row: Mapping[str, object]) -> Replicas:
    def nodes(key: str) -> tuple[str, ...]:
        value = row.get(key)
        return tuple(str(n) for n in value) if isinstance(value, list) else ()

    leader = row.get("leader")
    return Replicas(
        str(row["name"]),
        str(row.get("type") or "classic"),
        str(leader) if leader else None,
        nodes("members"),
        nodes("online"),
    )


def report(
    topo: Topology, found: Mapping[str, Replicas], expected: int | None
) -> tuple[list[str], list[str]]:
    """(one line per replicated queue of ``topo``, the problems); ``expected``: replicas asked
    for each quorum queue (None: every node, which is not checked)."""
    lines: list[str] = []
    problems: list[str] = []
    for queue in topo.queues:
        kind = queue.arguments.get("x-queue-type")
        replicas = found.get(queue.name)
        if kind not in REPLICATED or replicas is None:
            continue  # a missing queue is reported by the AMQP check already
        lines.append(describe(replicas))
        if replicas.leader is None:
            problems.append(f"queue {queue.name}: no leader (a majority of its members is down)")
        if kind == "quorum" and expected and len(replicas.members) < expected:
            problems.append(
                f"queue {queue.name}: {len(replicas.members)} member(s), fewer than the"
                f" {expected} asked for (`rabbitmq-queues grow` adds members)"
            )
    return lines, problems


def describe(replicas: Replicas) -> str:
    """``queue N (quorum): leader L; members A, B, C; offline: C``."""
    offline = [m for m in replicas.members if m not in replicas.online]
    text = (
        f"queue {replicas.name} ({replicas.kind}): leader {replicas.leader or 'none'};"
        f" members {_names(replicas.members)}"
    )
    return text + (f"; offline: {_names(offline)}" if offline else "")


def _names(nodes: Sequence[str]) -> str:
    return ", ".join(nodes) if nodes else "none"
