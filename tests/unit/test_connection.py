"""Broker URL lists (producers.connection), the quorum size they imply, the replica report."""

from __future__ import annotations

import pytest
from tenacity import RetryCallState

from exitpipe.cli import main
from exitpipe.settings import Settings, quorum_size, topology_of
from producers.connection import Nodes, each_node_first, parse_urls
from producers.errors import BrokerError, redact
from producers.publisher import STALL_SECONDS, _stall
from producers.replicas import Replicas, report
from schemas.topology import topology

A = "amqp://site:s3cret@rabbit-1:5672/%2F"
B = "amqps://other:hunter2@rabbit-2.example/prod"
C = "amqp://rabbit-3:5673/%2F"


def test_one_url_and_a_list() -> None:
    assert parse_urls(A) == (A,)
    assert parse_urls(f"{A}, {B} ,{C}") == (A, B, C)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://rabbit/", "the URL must start with amqp:// or amqps://"),
        ("", "the URL is empty"),
        (f"{A},", "URL 2 of 2 is empty (a stray comma?)"),
        (f"{A},,{C}", "URL 2 of 3 is empty"),
        (f"{A},rabbit-2:5672", "URL 2 of 2 must start with amqp:// or amqps://"),
        (f"{A},amqp://rabbit-1:5672/other", "URL 2 of 2 names the node of URL 1 again"),
        ("amqp://u:pa,ss@rabbit/", "URL 1 of 2 has a port that is not a number"),
        (f"{A},amqp://h:99999/", "URL 2 of 2 has a port that is not a number"),
        (f"{A},amqp://h/?heartbeat=soon", "URL 2 of 2 has an option pika refuses"),
    ],
)
def test_a_bad_list_is_refused_with_the_reason_and_no_secret(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_urls(text)
    assert reason in str(caught.value)
    assert "s3cret" not in str(caught.value) and "ss@" not in str(caught.value)


def test_settings_and_the_cli_refuse_a_bad_list_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match="URL 2 of 2 is empty"):
        Settings(amqp_url=f"{A},")
    assert main(["classifier", "--amqp-url", f"{A},ftp://x/"]) == 2
    err = capsys.readouterr().err
    assert "amqp_url" in err and "URL 2 of 2 must start with amqp://" in err
    assert "s3cret" not in err


def test_redact_hides_every_password_of_a_list() -> None:
    shown = redact(f"{A},{B},{C}")
    assert shown == (
        "amqp://site:***@rabbit-1:5672/%2F,amqps://other:***@rabbit-2.example/prod,"
        "amqp://rabbit-3:5673/%2F"
    )
    assert redact("amqp://u:pa,ss@h/") == "amqp://u:***@h/"  # a comma is not always a cut


def test_nodes_rotate_and_keep_their_own_credentials_vhost_and_tls() -> None:
    nodes = Nodes(f"{A},{B},{C}", heartbeat=7)
    assert len(nodes) == 3 and "s3cret" not in str(nodes)
    seen = []
    for _ in range(4):
        params = nodes.current
        seen.append((params.host, params.credentials.username, params.virtual_host))
        assert params.heartbeat == 7 and params.connection_attempts == 1
        nodes.advance()
    assert seen == [
        ("rabbit-1", "site", "/"),
        ("rabbit-2.example", "other", "prod"),
        ("rabbit-3", "guest", "/"),
        ("rabbit-1", "site", "/"),
    ]
    assert Nodes(B).current.ssl_options is not None and Nodes(A).current.ssl_options is None
    with pytest.raises(BrokerError, match="bad broker URL list: URL 2 of 2"):
        Nodes(f"{A},{A}")


def test_each_node_is_tried_once_before_backing_off() -> None:
    nodes = Nodes(f"{A},{B},{C}")
    wait = each_node_first(nodes, lambda state: 9.0)

    def state(attempt: int) -> RetryCallState:
        s = RetryCallState(None, None, (), {})
        s.attempt_number = attempt
        return s

    assert [wait(state(n)) for n in range(1, 7)] == [0.0, 0.0, 9.0, 0.0, 0.0, 9.0]
    single = each_node_first(Nodes(A), lambda state: 9.0)
    assert [single(state(n)) for n in (1, 2)] == [9.0, 9.0]  # one URL: as before


def test_a_silent_node_is_left_sooner_only_when_there_are_others() -> None:
    assert _stall(30, 5, 1) == 30
    assert _stall(30, 5, 3) == STALL_SECONDS
    assert _stall(6, 2, 3) == 2  # never shorter than a connection attempt


@pytest.mark.parametrize(
    ("urls", "setting", "expected"),
    [
        (A, None, None),
        (f"{A},{B}", None, 2),
        (f"{A},{B},{C}", None, 3),
        (",".join(f"amqp://n{i}/" for i in range(5)), None, 3),
        (f"{A},{B}", 0, None),
        (A, 5, 5),
    ],
)
def test_quorum_size_is_one_per_node_at_most_three(
    urls: str, setting: int | None, expected: int | None
) -> None:
    settings = Settings(amqp_url=urls, quorum_size=setting)
    assert quorum_size(settings) == expected
    queues = {q.name: q.arguments for q in topology_of(settings).queues}
    for name, arguments in queues.items():
        if arguments["x-queue-type"] == "quorum":
            assert arguments.get("x-quorum-initial-group-size") == expected, name
        else:
            assert "x-quorum-initial-group-size" not in arguments


def test_one_url_declares_what_it_always_did() -> None:
    assert topology_of(Settings(amqp_url=A)) == topology("exitpipe")


def test_replica_report_names_leader_members_and_problems() -> None:
    topo = topology("ns")
    full = ("n1", "n2", "n3")
    found = {
        "ns.classify": Replicas("ns.classify", "quorum", "n1", full, full),
        "ns.job-state": Replicas("ns.job-state", "quorum", None, full, ("n1",)),
        "ns.archive": Replicas("ns.archive", "stream", "n2", full, full),
        "ns.dead-letters": Replicas("ns.dead-letters", "quorum", "n3", ("n3",), ("n3",)),
    }
    lines, problems = report(topo, found, 3)
    assert lines == [
        "queue ns.classify (quorum): leader n1; members n1, n2, n3",
        "queue ns.job-state (quorum): leader none; members n1, n2, n3; offline: n2, n3",
        "queue ns.archive (stream): leader n2; members n1, n2, n3",
        "queue ns.dead-letters (quorum): leader n3; members n3",
    ]
    assert problems == [
        "queue ns.job-state: no leader (a majority of its members is down)",
        "queue ns.dead-letters: 1 member(s), fewer than the 3 asked for"
        " (`rabbitmq-queues grow` adds members)",
    ]
    assert report(topo, found, None)[1] == problems[:1]  # the broker's default: not checked
