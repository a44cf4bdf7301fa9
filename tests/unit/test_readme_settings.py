"""The README's settings table is `exitpipe config table`; config output shows no password."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitpipe.cli import main
from exitpipe.commands.config import END_MARKER, START_MARKER, env_name, replace_table
from exitpipe.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    out: str = capsys.readouterr().out
    return out


def readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(START_MARKER) + len(START_MARKER), text.index(END_MARKER)
    return text[start:end].strip()


def test_readme_table_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert readme_table() == run(capsys, "config", "table").strip(), (
        "README.md is stale: run `exitpipe config table --update README.md`"
    )


def test_table_has_a_row_per_setting_and_no_password(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run(capsys, "config", "table").splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == [env_name(n) for n in Settings.model_fields]
    assert all(r.count(" | ") == 2 and r.rstrip(" |") for r in rows)
    assert "amqp://guest:***@" in rows[0] and "guest:guest" not in "".join(rows)


def test_update_rewrites_only_between_the_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# head\n{START_MARKER}\nold\n{END_MARKER}\ntail\n")
    run(capsys, "config", "table", "--update", str(doc))
    table = run(capsys, "config", "table").strip()
    assert doc.read_text() == f"# head\n{START_MARKER}\n{table}\n{END_MARKER}\ntail\n"
    assert replace_table(doc.read_text(), table) == doc.read_text()
    with pytest.raises(ValueError):
        replace_table("no markers", table)


def test_show_redacts_passwords_and_names_sources(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXITPIPE_AMQP_URL", "amqps://u:broker-secret@rabbit.example/%2F")
    store = "postgresql://u:db-secret@db.example/exitpipe"
    text = run(capsys, "config", "show", "--store", store, "--namespace", "ns-1")
    assert "secret" not in text
    assert "amqps://u:***@rabbit.example/%2F" in text and "postgresql://u:***@db.example" in text
    sources = {line.split()[0]: line.split()[-1] for line in text.splitlines()[2:]}
    assert sources["EXITPIPE_AMQP_URL"] == "environment"
    assert sources["EXITPIPE_STORE"] == sources["EXITPIPE_NAMESPACE"] == "flag"
    assert sources["EXITPIPE_POLICY"] == "default"
    shown = json.loads(run(capsys, "config", "show", "--json", "--store", store))
    assert set(shown) == set(Settings.model_fields) and "secret" not in json.dumps(shown)
