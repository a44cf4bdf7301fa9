"""The local outbox and the never-lose-an-event policy, with a scripted in-memory publisher."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from producers.deliver import Status, deliver
from producers.errors import BrokerUnreachable
from producers.publisher import Outcome, Outgoing
from producers.spool import Spool

OK = Outcome.CONFIRMED


def message(n: int, body: bytes | None = None) -> Outgoing:
    return Outgoing("ns.events", f"exit.site-{n}", body or b'{"n": %d}' % n, f"id-{n}")


class FakePublisher:
    """Answers each publish call with the next script entry (outcomes, or an error)."""

    def __init__(self, *script: Sequence[Outcome] | Exception | str) -> None:
        self.script = list(script)
        self.calls: list[list[Outgoing]] = []

    def publish(self, messages: Sequence[Outgoing]) -> list[Outcome]:
        self.calls.append(list(messages))
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        if step == "all":
            return [OK] * len(messages)
        return list(step)  # type: ignore[arg-type]


def run(publisher: FakePublisher, spool: Spool, messages: Sequence[Outgoing] = ()) -> Any:
    return deliver(publisher, spool, messages)  # type: ignore[arg-type]


def test_a_message_round_trips_byte_for_byte(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    original = Outgoing("x", "k", b"\xff\x00 not utf-8", "id-1", None, {"h": "v"})
    spool.put(original)
    spool.put(message(2))
    assert [m for _, m in spool.pending()] == [original, message(2)]


def test_pending_is_in_arrival_order_and_keeps_the_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    paths = [spool.put(message(n)) for n in (3, 1, 2)]
    assert [p for p, _ in spool.pending()] == paths
    assert [m.message_id for _, m in spool.pending()] == ["id-3", "id-1", "id-2"]


def test_files_are_readable_json_and_no_temporary_file_remains(tmp_path: Path) -> None:
    path = Spool(tmp_path).put(message(1))
    record = json.loads(path.read_text())
    assert record["body"] == '{"n": 1}' and record["message_id"] == "id-1"
    assert path.name.endswith("-id-1.json")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == [path.name]


def test_remove_forgets_and_tolerates_a_missing_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = spool.put(message(1)), spool.put(message(2))
    spool.remove(first)
    spool.remove(first)
    assert [p for p, _ in spool.pending()] == [second] and spool.count() == 1


def test_an_unreadable_file_is_left_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "0000-broken.json").write_text("{not json")
    spool.put(message(1))
    assert [m.message_id for _, m in spool.pending()] == ["id-1"]
    assert (tmp_path / "0000-broken.json").exists()


def test_a_missing_directory_is_an_empty_spool(tmp_path: Path) -> None:
    assert Spool(tmp_path / "nope").pending() == []


def test_only_one_flusher_at_a_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with spool.flushing() as first, spool.flushing() as second:
        assert (first, second) == (True, False)
    with spool.flushing() as again:
        assert again


def test_a_confirmed_event_leaves_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    result = run(FakePublisher("all"), spool, [message(1)])
    assert (result.status, result.confirmed, result.waiting) == (Status.DELIVERED, 1, 0)


def test_the_spool_is_flushed_oldest_first_before_the_new_event(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(message(1))
    spool.put(message(2))
    publisher = FakePublisher("all")
    result = run(publisher, spool, [message(3)])
    assert [m.message_id for m in publisher.calls[0]] == ["id-1", "id-2", "id-3"]
    assert (result.status, result.confirmed, result.waiting) == (Status.DELIVERED, 3, 0)


def test_an_outage_keeps_what_was_not_confirmed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(message(1))
    outage = BrokerUnreachable("broker down", [OK, Outcome.INDETERMINATE])
    result = run(FakePublisher(outage), spool, [message(2)])
    assert result.status is Status.SPOOLED and result.problems == ("broker down",)
    assert [m.message_id for _, m in spool.pending()] == ["id-2"]


def test_an_unroutable_event_is_kept_and_named_loudly(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    result = run(FakePublisher([Outcome.RETURNED]), spool, [message(1)])
    assert result.status is Status.SPOOLED and spool.count() == 1
    (problem,) = result.problems
    assert "'ns.events'" in problem and "'exit.site-1'" in problem
    assert "exitpipe topology" in problem


def test_a_nacked_event_is_kept(tmp_path: Path) -> None:
    result = run(FakePublisher([Outcome.NACKED]), Spool(tmp_path), [message(1)])
    assert result.status is Status.SPOOLED and "nacked" in result.problems[0]


def test_an_event_the_spool_cannot_keep_is_still_published(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = run(FakePublisher("all"), Spool(blocked / "spool"), [message(1)])
    assert result.status is Status.DELIVERED and "cannot keep" in result.problems[0]


def test_an_event_neither_published_nor_kept_is_lost_and_said_so(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = run(FakePublisher(BrokerUnreachable("down")), Spool(blocked / "spool"), [message(1)])
    assert result.status is Status.LOST


def test_flushing_an_empty_spool_publishes_nothing(tmp_path: Path) -> None:
    publisher = FakePublisher()
    result = run(publisher, Spool(tmp_path))
    assert publisher.calls == [] and result.status is Status.DELIVERED


def test_when_another_process_flushes_only_the_new_event_is_sent(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(message(1))
    publisher = FakePublisher("all")
    with spool.flushing():
        result = run(publisher, spool, [message(2)])
    assert [m.message_id for m in publisher.calls[0]] == ["id-2"]
    assert (result.status, result.waiting) == (Status.DELIVERED, 1)
