"""Every input limit (DESIGN 3), at each place input comes in: one row per limit and surface.

``test_schemas.py`` already holds the wire limits of exit and lifecycle events (body over
64 KiB, job_id and site over 128 characters or with a bad character, reason over 4,096,
sites over 1,000, return_code outside int32, each at the limit and one past it) and
``test_policy.py`` the policy name and rule sites. This file adds what those leave out:
the constants themselves, the nested fields of a transition, a policy's version and rule
id, the classifier's handling of an oversized body, and the command line, where each
limit must give exit status 2 naming the field before anything is published or run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pika.spec import BasicProperties

from consumers.amqp import DeadLetter, Delivery
from consumers.classifier import ClassifierHandler
from consumers.policy import INT32, MAX_NAME_CHARS, PolicyError, load_policy, parse_policy
from exitpipe.cli import main
from producers.users import MAX_SITES as MAX_USER_SITES
from schemas.events import MAX_BODY_BYTES, MAX_REASON_CHARS, MAX_SITES, Transition
from schemas.topology import Names
from tests.unit.test_schemas import WHEN, body, exit_dict, lifecycle_dict, refused, transition_dict

ID_OK, ID_LONG = "i" * 128, "i" * 129


def test_the_limits_are_the_designs() -> None:
    assert MAX_BODY_BYTES == 64 * 1024
    assert MAX_REASON_CHARS == 4096
    assert MAX_SITES == MAX_USER_SITES == 1000
    assert MAX_NAME_CHARS == 128
    assert INT32 == (-(2**31), 2**31 - 1)


# -- the nested fields of a transition (the job-state consumer's input) ----------------------


def _cause(**changes: Any) -> dict[str, Any]:
    return {"site": "site-1", "code": "EXCEPTION", "occurred_at": WHEN, **changes}


def _policy(**changes: Any) -> dict[str, str]:
    return {"name": "p", "version": "1", "rule": "r", **changes}


TRANSITION_LIMITS = [
    # field, at the limit, one past it
    ("cause.site", _cause(site=ID_OK), _cause(site=ID_LONG)),
    ("cause.reason", _cause(reason="r" * 4096), _cause(reason="r" * 4097)),
    ("cause.return_code", _cause(return_code=2**31 - 1), _cause(return_code=2**31)),
    ("cause.return_code", _cause(return_code=-(2**31)), _cause(return_code=-(2**31) - 1)),
    ("policy.name", _policy(name="n" * 128), _policy(name="n" * 129)),
    ("policy.version", _policy(version="v" * 128), _policy(version="v" * 129)),
    ("policy.rule", _policy(rule="r" * 128), _policy(rule="r" * 129)),
]


@pytest.mark.parametrize(("field", "ok", "over"), TRANSITION_LIMITS)
def test_transition_limits(field: str, ok: dict[str, Any], over: dict[str, Any]) -> None:
    part = field.split(".")[0]
    assert Transition.model_validate(transition_dict(**{part: ok}))
    assert refused(body(transition_dict(**{part: over}))).startswith(f"{field}:")


def test_each_listed_site_is_an_identifier() -> None:
    assert refused(body(lifecycle_dict(sites=["ok", ID_LONG]))).startswith("sites.1:")


# -- a policy's version and rule id (recorded with every decision) ----------------------------


@pytest.mark.parametrize(
    ("line", "field"),
    [('version = "{}"', "version"), ('[[rules]]\nid = "{}"\naction = "fail"', "rules[1]")],
)
def test_policy_version_and_rule_id_at_most_128(line: str, field: str) -> None:
    head = 'name = "p"\n' + ("" if "version" in line else 'version = "1"\n')
    assert parse_policy(head + line.format("x" * 128) + "\n", "p.toml")
    with pytest.raises(PolicyError, match=rf"p.toml: {re_escape(field)}.*128"):
        parse_policy(head + line.format("x" * 129) + "\n", "p.toml")


def re_escape(text: str) -> str:
    return text.replace("[", r"\[").replace("]", r"\]")


# -- the classifier: an oversized body is dead-lettered, not parsed ---------------------------


def test_the_classifier_dead_letters_an_oversized_body() -> None:
    handler = ClassifierHandler(load_policy("nvflare-2.8"), Names("ns"))
    raw = body(exit_dict())
    padded = raw + b" " * (MAX_BODY_BYTES + 1 - len(raw))
    action = handler.handle(Delivery(1, padded, BasicProperties(), "exit.site-1", False, 1))
    assert isinstance(action, DeadLetter)
    assert action.reason.startswith(f"body: {MAX_BODY_BYTES + 1} bytes, over the limit")


# -- the command line: exit 2 naming the field, before any broker or worker ------------------

REPORT = ["report", "--site", "site-1", "--job", "job-1", "--code", "EXCEPTION"]
SITES_1001 = ",".join(f"s{n}" for n in range(1001))

CLI_LIMITS = [
    pytest.param([*REPORT, "--job", ID_LONG], "job_id:", id="report-job-129"),
    pytest.param([*REPORT, "--job", "a/b"], "job_id:", id="report-job-bad-char"),
    pytest.param([*REPORT, "--site", ID_LONG], "site:", id="report-site-129"),
    pytest.param([*REPORT, "--site", "site 1"], "site:", id="report-site-bad-char"),
    pytest.param([*REPORT, "--reason", "r" * 4097], "reason:", id="report-reason-4097"),
    pytest.param([*REPORT, "--return-code", str(2**31)], "return_code:", id="report-rc-int32"),
    pytest.param(
        ["lifecycle", "--job", "j", "--status", "RUNNING", "--sites", SITES_1001],
        "sites:",
        id="lifecycle-sites-1001",
    ),
    pytest.param(
        ["lifecycle", "--job", "j", "--status", "RUNNING", "--sites", f"a,{ID_LONG}"],
        "sites.1:",
        id="lifecycle-site-129",
    ),
    pytest.param(["topology", "--users", ID_LONG, "--print"], "sites:", id="users-site-129"),
    pytest.param(["topology", "--users", "a/b", "--print"], "sites:", id="users-site-bad-char"),
    pytest.param(["topology", "--users", SITES_1001, "--print"], "sites:", id="users-sites-1001"),
    pytest.param(["config", "show", "--namespace", "n" * 65], "namespace", id="namespace-65"),
    pytest.param(["config", "show", "--prefetch", "65536"], "prefetch", id="prefetch-65536"),
]


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No broker to reach and a private spool: a missed check would show, not publish."""
    for name in ("EXITPIPE_AMQP_URL", "EXITPIPE_NAMESPACE", "EXITPIPE_REQUIRE_SITE_USER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXITPIPE_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    monkeypatch.setenv("EXITPIPE_RETRY_SECONDS", "0.2")
    monkeypatch.setenv("EXITPIPE_SPOOL_DIR", str(tmp_path / "spool"))
    return tmp_path


@pytest.mark.parametrize(("argv", "field"), CLI_LIMITS)
def test_the_command_line_refuses_naming_the_field(
    argv: list[str], field: str, nowhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert field in captured.err and not captured.out
    assert not (nowhere / "spool").exists()


def test_report_with_a_129_character_job_id_exits_2_naming_job_id(
    nowhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--job", ID_LONG, "--site", "site-1", "--code", "EXCEPTION"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exitpipe report: job_id:") and "128" in err


def test_launch_refuses_before_the_worker_runs(
    nowhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = nowhere / "ran"
    argv = ["launch", "--job", ID_LONG, "--site", "site-1", "--", "touch", str(ran)]
    assert main(argv) == 2
    assert "job_id" in capsys.readouterr().err and not ran.exists()


def test_a_generated_password_never_reads_as_a_command_line_option() -> None:
    # token_urlsafe starts with '-' one time in 64; rabbitmqctl then took it for an option.
    from producers.users import new_password

    passwords = [new_password() for _ in range(2000)]
    assert not [p for p in passwords if p.startswith("-")]
    assert len(set(passwords)) == len(passwords) and min(map(len, passwords)) >= 32
