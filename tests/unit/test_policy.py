"""The classification policy (DESIGN 2, 2a): decisions as tables, policy files, the CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import exitpipe.cli
from consumers.policy import (
    BUILTINS,
    Decision,
    Policy,
    PolicyError,
    Rule,
    ValueMatch,
    decide,
    describe_policy,
    load_policy,
    parse_policy,
    policy_as_dict,
)
from schemas.codes import Action, Code, JobStatus, Launcher
from schemas.events import ExitEvent, PolicyRef

NARROW = BUILTINS["nvflare-2.8"]
LEGACY = BUILTINS["nvflare-2.8-legacy"]
FAIL, STOP, IGNORE = Action.FAIL, Action.STOP, Action.IGNORE
EXCEPTION_STATUS = JobStatus.FINISHED_EXECUTION_EXCEPTION
ABORTED_STATUS = JobStatus.FINISHED_ABORTED


def exit_event(
    code: Code | None = None,
    return_code: int | None = None,
    launcher: Launcher | None = None,
    site: str = "site-1",
) -> ExitEvent:
    """A valid exit event; only what a test varies is given."""
    return ExitEvent(
        event_id=uuid.uuid4(),
        job_id="job-1",
        site=site,
        launcher=launcher,
        code=code,
        return_code=return_code,
        occurred_at="2026-01-31T12:00:00Z",
    )


def policy(*rules: Rule, default: Action = IGNORE) -> Policy:
    """A policy named ``t`` version ``1`` with the given rules."""
    return Policy(name="t", version="1", default=default, rules=rules)


# -- the built-ins, code by code (DESIGN 2's table) -------------------------------------------

# code -> (action, rule) under nvflare-2.8 and under nvflare-2.8-legacy
BUILTIN_TABLE = {
    Code.SUCCESS: ((IGNORE, "default"), (IGNORE, "default")),
    Code.EXECUTION_ERROR: ((IGNORE, "default"), (FAIL, "fail-on-exception")),
    Code.ABORTED: ((STOP, "stop-on-abort"), (STOP, "stop-on-abort")),
    Code.EXCEPTION: ((FAIL, "fail-on-exception"), (FAIL, "fail-on-exception")),
    Code.UNSAFE_COMPONENT: ((STOP, "stop-on-abort"), (STOP, "stop-on-abort")),
    Code.CONFIG_ERROR: ((FAIL, "fail-on-exception"), (FAIL, "fail-on-exception")),
    Code.INFRASTRUCTURE_ERROR: ((IGNORE, "default"), (IGNORE, "default")),  # new in FLARE 2.9
    Code.UNKNOWN: ((IGNORE, "default"), (IGNORE, "default")),
}
TARGET = {FAIL: EXCEPTION_STATUS, STOP: ABORTED_STATUS, IGNORE: None}
BUILTIN_CASES = [
    pytest.param(pol, code, *expected[i], id=f"{pol.name}-{code.name}")
    for code, expected in BUILTIN_TABLE.items()
    for i, pol in enumerate((NARROW, LEGACY))
]
UNKNOWN_INTEGERS = [2, 126, 128, 137, 255, 1000, -9, -15, -(2**31), 2**31 - 1]


def test_the_table_covers_every_code() -> None:
    assert set(BUILTIN_TABLE) == set(Code)


@pytest.mark.parametrize(("pol", "code", "action", "rule"), BUILTIN_CASES)
@pytest.mark.parametrize("form", ["name", "value", "both"])
def test_builtin_decides_every_code(
    pol: Policy, code: Code, action: Action, rule: str, form: str
) -> None:
    event = {
        "name": exit_event(code=code),
        "value": exit_event(return_code=int(code)),
        "both": exit_event(code=code, return_code=int(code)),
    }[form]
    decision = decide(event, pol)
    assert decision.action is action
    assert decision.target_status is TARGET[action]
    assert decision.policy == PolicyRef(name=pol.name, version="1", rule=rule)


@pytest.mark.parametrize("pol", [NARROW, LEGACY], ids=lambda p: p.name)
@pytest.mark.parametrize("value", UNKNOWN_INTEGERS)
def test_unknown_integer_alone_is_unknown_and_ignored(pol: Policy, value: int) -> None:
    event = exit_event(return_code=value)
    assert event.effective_code is Code.UNKNOWN
    decision = decide(event, pol)
    assert (decision.action, decision.policy.rule, decision.target_status) == (
        IGNORE,
        "default",
        None,
    )


@pytest.mark.parametrize(("pol", "code", "action", "rule"), BUILTIN_CASES)
@pytest.mark.parametrize("value", UNKNOWN_INTEGERS)
def test_builtins_match_the_name_when_the_value_is_unknown(
    pol: Policy, code: Code, action: Action, rule: str, value: int
) -> None:
    decision = decide(exit_event(code=code, return_code=value), pol)
    assert (decision.action, decision.policy.rule) == (action, rule)


def test_legacy_fails_what_the_narrow_policy_ignores() -> None:
    teardown_noise = exit_event(code=Code.EXECUTION_ERROR, return_code=1)
    assert decide(teardown_noise, NARROW).action is IGNORE
    assert decide(teardown_noise, LEGACY).action is FAIL


def test_builtins_are_named_and_versioned() -> None:
    assert set(BUILTINS) == {"nvflare-2.8", "nvflare-2.8-legacy", "nvflare-2.9"}
    for name, pol in BUILTINS.items():
        assert (pol.name, pol.version, pol.default) == (name, "1", IGNORE)
        if name != "nvflare-2.9":  # its rules: tests/unit/test_policy_29.py
            assert [r.id for r in pol.rules] == ["fail-on-exception", "stop-on-abort"]


# -- conditions -------------------------------------------------------------------------------

OOM = Rule("oom", FAIL, values=ValueMatch("In", frozenset({137, -9})))
OOM_BY_NAME = Rule("by-name", STOP, codes=frozenset({Code.EXECUTION_ERROR}))
UNKNOWN_NAME = Rule("unknown", STOP, codes=frozenset({Code.UNKNOWN}))
NON_ZERO = Rule("non-zero", FAIL, values=ValueMatch("NotIn", frozenset({0})))


@pytest.mark.parametrize(
    ("rule", "event", "matches"),
    [
        # values match the raw integer, even when the name says something else
        (OOM, exit_event(code=Code.EXECUTION_ERROR, return_code=137), True),
        (OOM, exit_event(return_code=137), True),
        (OOM, exit_event(return_code=-9), True),
        (OOM, exit_event(code=Code.EXECUTION_ERROR, return_code=1), False),
        (OOM, exit_event(code=Code.EXECUTION_ERROR), False),  # the value is 1, EXECUTION_ERROR's
        (OOM, exit_event(return_code=-15), False),
        # names match the effective code: the name given, else the name of the value
        (OOM_BY_NAME, exit_event(code=Code.EXECUTION_ERROR, return_code=137), True),
        (OOM_BY_NAME, exit_event(return_code=1), True),
        (OOM_BY_NAME, exit_event(return_code=137), False),
        (UNKNOWN_NAME, exit_event(return_code=137), True),
        (UNKNOWN_NAME, exit_event(code=Code.UNKNOWN), True),
        (UNKNOWN_NAME, exit_event(code=Code.EXECUTION_ERROR, return_code=137), False),
        # NotIn; a code given by name alone is matched by its own integer
        (NON_ZERO, exit_event(return_code=1), True),
        (NON_ZERO, exit_event(return_code=-9), True),
        (NON_ZERO, exit_event(return_code=0), False),
        (NON_ZERO, exit_event(code=Code.SUCCESS), False),
        (NON_ZERO, exit_event(code=Code.EXCEPTION), True),
        (NON_ZERO, exit_event(code=Code.SUCCESS, return_code=137), True),
    ],
)
def test_codes_and_values(rule: Rule, event: ExitEvent, matches: bool) -> None:
    assert decide(event, policy(rule)).policy.rule == (rule.id if matches else "default")


K8S_ONLY = Rule("k8s", FAIL, launchers=frozenset({Launcher.K8S}))
PROCESS_ONLY = Rule("process", FAIL, launchers=frozenset({Launcher.PROCESS}))
SITE_1 = Rule("site-1", FAIL, sites=frozenset({"site-1", "site:2"}))


@pytest.mark.parametrize(
    ("rule", "event", "matches"),
    [
        (K8S_ONLY, exit_event(code=Code.ABORTED, launcher=Launcher.K8S), True),
        (K8S_ONLY, exit_event(code=Code.ABORTED, launcher=Launcher.DOCKER), False),
        (K8S_ONLY, exit_event(code=Code.ABORTED), False),
        (PROCESS_ONLY, exit_event(code=Code.ABORTED), True),  # no launcher means process
        (PROCESS_ONLY, exit_event(code=Code.ABORTED, launcher=Launcher.OTHER), False),
        (SITE_1, exit_event(code=Code.ABORTED, site="site-1"), True),
        (SITE_1, exit_event(code=Code.ABORTED, site="site:2"), True),
        (SITE_1, exit_event(code=Code.ABORTED, site="site-10"), False),
        (SITE_1, exit_event(code=Code.ABORTED, site="SITE-1"), False),
    ],
)
def test_launchers_and_sites(rule: Rule, event: ExitEvent, matches: bool) -> None:
    assert decide(event, policy(rule)).policy.rule == (rule.id if matches else "default")


def test_every_condition_of_a_rule_must_match() -> None:
    rule = Rule(
        "k8s-oom",
        FAIL,
        codes=frozenset({Code.EXECUTION_ERROR}),
        values=ValueMatch("In", frozenset({137})),
        launchers=frozenset({Launcher.K8S}),
        sites=frozenset({"site-1"}),
    )
    full = {"code": Code.EXECUTION_ERROR, "return_code": 137, "launcher": Launcher.K8S}
    assert decide(exit_event(**full), policy(rule)).action is FAIL
    for key, other in [("code", Code.EXCEPTION), ("return_code", 1), ("launcher", None)]:
        assert decide(exit_event(**{**full, key: other}), policy(rule)).action is IGNORE
    assert decide(exit_event(**full, site="site-2"), policy(rule)).action is IGNORE


@pytest.mark.parametrize("code", list(Code))
@pytest.mark.parametrize("value", [None, 0, 137, -9])
def test_a_rule_without_conditions_matches_everything(code: Code, value: int | None) -> None:
    catch_all = policy(Rule("all", STOP))
    assert decide(exit_event(code=code, return_code=value), catch_all).policy.rule == "all"


def test_first_match_wins() -> None:
    pol = policy(Rule("first", STOP, codes=frozenset({Code.EXCEPTION})), Rule("second", FAIL))
    assert decide(exit_event(code=Code.EXCEPTION), pol).policy.rule == "first"
    assert decide(exit_event(code=Code.SUCCESS), pol).policy.rule == "second"


@pytest.mark.parametrize("default", list(Action))
def test_the_default_action_is_honoured(default: Action) -> None:
    decision = decide(exit_event(code=Code.SUCCESS), policy(OOM, default=default))
    ref = PolicyRef(name="t", version="1", rule="default")
    assert decision == Decision(default, ref, TARGET[default])
    assert decision.target_status is TARGET[default]


def test_decisions_are_built_once_per_policy() -> None:
    first = decide(exit_event(code=Code.EXCEPTION), NARROW)
    again = decide(exit_event(code=Code.CONFIG_ERROR, site="site-9"), NARROW)
    assert first is again


RULES = st.builds(
    Rule,
    id=st.sampled_from(["a", "b", "c"]),
    action=st.sampled_from(list(Action)),
    codes=st.none() | st.frozensets(st.sampled_from(list(Code)), min_size=1),
    values=st.none()
    | st.builds(
        ValueMatch,
        operator=st.sampled_from(["In", "NotIn"]),
        values=st.frozensets(st.sampled_from([0, 1, 9, 101, 127, 137, -9]), min_size=1),
    ),
)
POLICIES = st.builds(
    Policy,
    name=st.just("p"),
    version=st.just("1"),
    default=st.sampled_from(list(Action)),
    rules=st.lists(RULES, max_size=4, unique_by=lambda rule: rule.id).map(tuple),
)


@given(pol=POLICIES, code=st.sampled_from(list(Code)))
def test_a_name_alone_a_value_alone_and_both_are_decided_alike(pol: Policy, code: Code) -> None:
    by_name = decide(exit_event(code=code), pol)
    assert decide(exit_event(return_code=int(code)), pol) == by_name
    assert decide(exit_event(code=code, return_code=int(code)), pol) == by_name


@given(pol=POLICIES, code=st.sampled_from(list(Code)), value=st.integers(-(2**31), 2**31 - 1))
def test_a_decision_names_a_rule_of_its_policy(pol: Policy, code: Code, value: int) -> None:
    decision = decide(exit_event(code=code, return_code=value), pol)
    by_id = {rule.id: rule.action for rule in pol.rules}
    expected = pol.default if decision.policy.rule == "default" else by_id[decision.policy.rule]
    assert decision.action is expected
    assert (decision.policy.name, decision.policy.version) == ("p", "1")


# -- policy files -----------------------------------------------------------------------------

DESIGN_EXAMPLE = """\
name = "site-policy"        # required
version = "3"               # required; recorded with every decision
default = "ignore"          # action when no rule matches: fail | stop | ignore

[[rules]]
id = "k8s-oom"              # optional; defaults to "rules[N]"
action = "fail"             # fail | stop | ignore
codes = ["EXECUTION_ERROR"] # code names of section 2a (optional)
values = { operator = "In", values = [137, -9] }   # raw integers, In or NotIn (optional)
launchers = ["k8s"]         # optional
sites = ["site-1"]          # optional
"""


def test_the_design_example_parses() -> None:
    assert parse_policy(DESIGN_EXAMPLE, "policy.toml") == Policy(
        name="site-policy",
        version="3",
        default=IGNORE,
        rules=(
            Rule(
                "k8s-oom",
                FAIL,
                codes=frozenset({Code.EXECUTION_ERROR}),
                values=ValueMatch("In", frozenset({137, -9})),
                launchers=frozenset({Launcher.K8S}),
                sites=frozenset({"site-1"}),
            ),
        ),
    )


def test_defaults_integer_version_and_rule_names() -> None:
    pol = parse_policy(
        'name = "p"\nversion = 7\n'
        '[[rules]]\naction = "stop"\ncodes = ["ABORTED"]\n'
        '[[rules]]\nid = "named"\naction = "fail"\n'
        '[[rules]]\naction = "ignore"\n'
        '[rules.values]\noperator = "NotIn"\nvalues = [0]\n'
    )
    assert (pol.name, pol.version, pol.default) == ("p", "7", IGNORE)
    assert [r.id for r in pol.rules] == ["rules[1]", "named", "rules[3]"]
    assert pol.rules[2].values == ValueMatch("NotIn", frozenset({0}))
    decision = decide(exit_event(code=Code.ABORTED), pol)
    assert decision.policy == PolicyRef(name="p", version="7", rule="rules[1]")


def test_a_policy_without_rules_uses_its_default() -> None:
    pol = parse_policy('name = "all-fail"\nversion = "1"\ndefault = "fail"\n')
    assert pol.rules == ()
    assert decide(exit_event(code=Code.SUCCESS), pol).action is FAIL


HEAD = 'name = "p"\nversion = "1"\n'
RULE_A = '[[rules]]\nid = "a"\naction = "fail"\n'
RULE_2 = '[[rules]]\naction = "stop"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # TOML itself
        ('name = "p', ["policy.toml: not valid TOML", "line 1, column 10"]),
        ("name = \n", ["not valid TOML", "Invalid value", "line 1, column 8"]),
        (HEAD + "\n  bad key = 3\n", ["not valid TOML", "line 4"]),
        (HEAD + 'name = "q"\n', ["not valid TOML", "line 3"]),
        # the top level
        ('version = "1"\n', ["policy.toml: name: missing (required)"]),
        ('name = "p"\n', ["policy.toml: version: missing (required)"]),
        ('name = ""\nversion = "1"\n', ["name: '' must be a string of 1 to 128"]),
        (f'name = "{"n" * 129}"\nversion = "1"\n', ["name:", "1 to 128 characters"]),
        ('name = 5\nversion = "1"\n', ["name: 5 must be a string"]),
        ('name = "p"\nversion = true\n', ["version: True must be a string or an integer"]),
        ('name = "p"\nversion = 1.5\n', ["version: 1.5 must be a string or an integer"]),
        (HEAD + 'default = "panic"\n', ["default: 'panic' is not one of fail, stop, ignore"]),
        (HEAD + 'colour = "red"\n', ["policy.toml: unknown key 'colour'", "name, version"]),
        (HEAD + "rules = 1\n", ["rules: must be an array of tables"]),
        (HEAD + "rules = [1, 2]\n", ["rules: must be an array of tables"]),
        # keys of a rule
        (HEAD + RULE_A + "code = []\n", ["rules[1] (id 'a'): unknown key 'code'", "codes"]),
        (HEAD + RULE_A + RULE_2 + "exit = 1\n", ["policy.toml: rules[2]: unknown key 'exit'"]),
        (HEAD + '[[rules]]\nid = "a"\n', ["rules[1] (id 'a'): action: missing (required)"]),
        (HEAD + "[[rules]]\nid = 3\naction = 'fail'\n", ["rules[1]: id: 3 must be a string"]),
        (HEAD + '[[rules]]\nid = ""\naction = "fail"\n', ["rules[1] (id ''): id: ''"]),
        (HEAD + RULE_A + RULE_A, ["rules[2] (id 'a'): id: already used"]),
        (HEAD + RULE_2 + '[[rules]]\nid = "rules[1]"\naction = "fail"\n', ["rules[2]", "used"]),
        (HEAD + '[[rules]]\nid = "default"\naction = "fail"\n', ["id: 'default' is reserved"]),
        # actions and codes
        (HEAD + RULE_2 + '[[rules]]\naction = "explode"\n', ["rules[2]: action: 'explode'"]),
        (HEAD + '[[rules]]\naction = "FAIL"\n', ["rules[1]: action:", "'FAIL' is not one of"]),
        (HEAD + RULE_A + 'codes = ["OOM"]\n', ["rules[1] (id 'a'): codes: 'OOM' is not one of"]),
        (HEAD + RULE_A + "codes = [101]\n", ["codes: 101 is not one of SUCCESS, EXECUTION_ERROR"]),
        (HEAD + RULE_A + 'codes = ["exception"]\n', ["codes: 'exception' is not one of"]),
        (HEAD + RULE_A + 'codes = "EXCEPTION"\n', ["codes: must be a non-empty array"]),
        (HEAD + RULE_A + "codes = []\n", ["rules[1] (id 'a'): codes: must be a non-empty array"]),
        # values
        (HEAD + RULE_A + "values = [137]\n", ["rules[1] (id 'a'): values: must be a table"]),
        (
            HEAD + RULE_A + 'values = { operator = "in", values = [1] }\n',
            ["rules[1] (id 'a'): values.operator: 'in' is not one of In, NotIn"],
        ),
        (HEAD + RULE_A + "values = { values = [1] }\n", ["values.operator: None is not one of"]),
        (HEAD + RULE_A + 'values = { operator = "In" }\n', ["values.values: must be a non-empty"]),
        (
            HEAD + RULE_A + 'values = { operator = "In", values = ["137"] }\n',
            ["rules[1] (id 'a'): values.values: '137' is not an integer"],
        ),
        (HEAD + RULE_A + 'values = { operator = "In", values = [1.5] }\n', ["1.5 is not an"]),
        (HEAD + RULE_A + 'values = { operator = "In", values = [true] }\n', ["True is not an"]),
        (
            HEAD + RULE_A + 'values = { operator = "In", values = [2147483648] }\n',
            ["values.values: 2147483648 is not an integer from -2147483648 to 2147483647"],
        ),
        (
            HEAD + RULE_A + 'values = { operator = "In", values = [1], match = "all" }\n',
            ["rules[1] (id 'a'): unknown key 'match'", "operator, values"],
        ),
        # launchers and sites (DESIGN 3 limits)
        (
            HEAD + RULE_A + 'launchers = ["kubernetes"]\n',
            ["launchers: 'kubernetes' is not one of process, docker, k8s, other"],
        ),
        (HEAD + RULE_A + 'launchers = ["K8S"]\n', ["launchers: 'K8S' is not one of"]),
        (HEAD + RULE_A + "launchers = []\n", ["launchers: must be a non-empty array"]),
        (HEAD + RULE_A + 'sites = ["site 1"]\n', ["rules[1] (id 'a'): sites: 'site 1' must be"]),
        (HEAD + RULE_A + 'sites = ["site/1"]\n', ["sites: 'site/1' must be 1 to 128 characters"]),
        (HEAD + RULE_A + 'sites = [""]\n', ["sites: '' must be 1 to 128 characters"]),
        (HEAD + RULE_A + 'sites = ["sité"]\n', ["sites: 'sité' must be"]),
        (HEAD + RULE_A + f'sites = ["{"s" * 129}"]\n', ["sites:", "must be 1 to 128"]),
        (HEAD + RULE_A + "sites = [1]\n", ["sites: 1 must be"]),
        (HEAD + RULE_A + 'sites = "site-1"\n', ["sites: must be a non-empty array"]),
    ],
)
def test_a_bad_policy_is_refused_naming_rule_and_problem(text: str, expected: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.toml")
    message = str(caught.value)
    assert message.startswith("policy.toml: ")
    for part in expected:
        assert part in message


def test_the_message_of_the_brief() -> None:
    text = HEAD + RULE_2 + '[[rules]]\nid = "k8s-oom"\naction = "explode"\n'
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.toml")
    assert str(caught.value) == (
        "policy.toml: rules[2] (id 'k8s-oom'): action: 'explode' is not one of fail, stop, ignore"
    )


def test_a_site_of_128_characters_is_accepted() -> None:
    site = "s." + "x" * 124 + ":-"
    pol = parse_policy(HEAD + RULE_A + f'sites = ["{site}"]\n')
    assert decide(exit_event(code=Code.SUCCESS, site=site), pol).policy.rule == "a"


# -- load_policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTINS))
def test_load_a_builtin_by_name(name: str) -> None:
    assert load_policy(name) is BUILTINS[name]


def test_load_a_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    assert load_policy(str(path)).name == "site-policy"


def test_load_names_the_file_in_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(HEAD + '[[rules]]\naction = "explode"\n', encoding="utf-8")
    with pytest.raises(PolicyError, match=rf"^{path}: rules\[1\]: action: 'explode'"):
        load_policy(str(path))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing.toml", "no such file, and not a built-in policy (nvflare-2.8"),
        (lambda p: p, "cannot read"),
        (lambda p: _write_bytes(p / "latin1.toml", b'name = "caf\xe9"\n'), "cannot read"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_load_refuses_an_unreadable_spec(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_policy(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- describing a policy ----------------------------------------------------------------------


def _row(text: str, label: str) -> str:
    """The one line of the by-code table that starts with ``label``."""
    (line,) = [line for line in text.splitlines() if line.startswith(label)]
    return line


@pytest.mark.parametrize(("pol", "code", "action", "rule"), BUILTIN_CASES)
def test_describe_lists_every_code_with_its_decision(
    pol: Policy, code: Code, action: Action, rule: str
) -> None:
    row = _row(describe_policy(pol), f"{code.name} ({int(code)})").split()
    becomes = "unchanged" if TARGET[action] is None else TARGET[action]
    assert row[2:] == [action.value, becomes, rule]


def test_describe_shows_header_rules_default_and_anything_else() -> None:
    text = describe_policy(NARROW)
    assert text.splitlines()[0].startswith("policy nvflare-2.8 version 1")
    fail_row = ["fail-on-exception", "fail", "FINISHED:EXECUTION_EXCEPTION"]
    assert _row(text, "fail-on-exception").split()[:3] == fail_row
    assert "EXCEPTION, CONFIG_ERROR" in _row(text, "fail-on-exception")
    assert _row(text, "default").split()[:3] == ["default", "ignore", "unchanged"]
    assert _row(text, "anything else").split()[-3:] == ["ignore", "unchanged", "default"]


def test_describe_shows_every_condition_and_an_unlisted_value() -> None:
    pol = parse_policy(
        DESIGN_EXAMPLE
        + '[[rules]]\naction = "stop"\nvalues = {operator = "NotIn", values = [0, 128]}\n'
    )
    text = describe_policy(pol)
    assert "code EXECUTION_ERROR; value In -9, 137; launcher k8s; site site-1" in _row(
        text, "k8s-oom"
    )
    assert "value NotIn 0, 128" in _row(text, "rules[2]")
    assert _row(text, "anything else").split()[-3:] == ["stop", "FINISHED:ABORTED", "rules[2]"]
    assert "(e.g. 129)" in _row(text, "anything else")
    assert _row(text, "SUCCESS (0)").split()[-1] == "default"


def test_policy_as_dict_is_json_data() -> None:
    data = json.loads(json.dumps(policy_as_dict(parse_policy(DESIGN_EXAMPLE))))
    assert data["name"] == "site-policy" and data["version"] == "3"
    assert data["default"] == "ignore"
    assert data["rules"] == [
        {
            "id": "k8s-oom",
            "action": "fail",
            "target_status": "FINISHED:EXECUTION_EXCEPTION",
            "codes": ["EXECUTION_ERROR"],
            "values": {"operator": "In", "values": [-9, 137]},
            "launchers": ["k8s"],
            "sites": ["site-1"],
            "stages": None,
        }
    ]
    assert len(data["by_code"]) == len(Code) + 1


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """``exitpipe.cli.main`` with only the policy command group, whatever else is in progress."""
    monkeypatch.setattr(exitpipe.cli, "COMMAND_MODULES", {"policy": ("policy",)})
    monkeypatch.delenv("EXITPIPE_POLICY", raising=False)
    return lambda *argv: exitpipe.cli.main(list(argv))


@pytest.fixture
def policy_file(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "policy.toml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


def test_cli_check_accepts_a_good_file(
    cli: Callable[..., int], policy_file: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("policy", "check", policy_file(DESIGN_EXAMPLE + RULE_2)) == 0
    out, err = capsys.readouterr()
    assert out == "ok: site-policy version 3, 2 rules\n"
    assert err == ""


def test_cli_check_refuses_a_bad_file(
    cli: Callable[..., int], policy_file: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = policy_file(HEAD + RULE_2 + '[[rules]]\nid = "k8s-oom"\naction = "explode"\n')
    assert cli("policy", "check", path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: rules[2] (id 'k8s-oom'): action: 'explode' is not one of" in err


def test_cli_check_refuses_a_missing_file(
    cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("policy", "check", str(tmp_path / "nope.toml")) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [("nvflare-2.8",), ()], ids=["named", "configured-default"])
def test_cli_show_prints_the_design_table(
    cli: Callable[..., int], capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    assert cli("policy", "show", *argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy nvflare-2.8 version 1")
    for code in Code:
        assert code.name in out
    assert "FINISHED:EXECUTION_EXCEPTION" in out
    assert "FINISHED:ABORTED" in out
    assert _row(out, "EXECUTION_ERROR (1)").split()[-3:] == ["ignore", "unchanged", "default"]


def test_cli_show_uses_the_configured_policy(
    cli: Callable[..., int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXITPIPE_POLICY", "nvflare-2.8-legacy")
    assert cli("policy", "show") == 0
    out = capsys.readouterr().out
    assert _row(out, "EXECUTION_ERROR (1)").split()[-2:] == [
        "FINISHED:EXECUTION_EXCEPTION",
        "fail-on-exception",
    ]
    assert cli("policy", "show", "--policy", "nvflare-2.8") == 0
    assert capsys.readouterr().out.startswith("policy nvflare-2.8 version")


def test_cli_show_json(
    cli: Callable[..., int], policy_file: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("policy", "show", policy_file(DESIGN_EXAMPLE), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["name"], data["version"], data["rules"][0]["id"]) == (
        "site-policy",
        "3",
        "k8s-oom",
    )


def test_cli_show_refuses_a_bad_policy(
    cli: Callable[..., int], policy_file: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("policy", "show", policy_file('name = "p"\n')) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "version: missing (required)" in err
