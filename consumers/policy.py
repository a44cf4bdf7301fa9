"""The classification policy of DESIGN section 2: ordered rules, first match wins. Pure.

``decide(event, policy)`` is the whole classifier rule and ``to_transition`` the message a
fail or stop decision sends on (the daemon and replay share both); everything else here
builds, reads or shows a ``Policy``. A rule matches when every condition it gives matches:

- ``codes`` against ``event.effective_code`` (an integer outside the code table is UNKNOWN);
- ``values`` against the raw integer: ``event.return_code``, or, when the event carries only a
  code name, that code's own FLARE integer (section 2a: one integer never means two things).
  So ``{code=X}``, ``{return_code=int(X)}`` and both together are decided alike, and a
  ``NotIn [0]`` rule never catches a SUCCESS reported by name alone;
- ``launchers`` against ``event.effective_launcher``; ``sites`` against ``event.site``;
- ``stages`` against ``event.stage`` (an exit without a stage never matches a ``stages`` rule).

A fail or stop rule may name the ``status`` it leads to (any FINISHED:* but COMPLETED); without
it, fail leads to FINISHED:EXECUTION_EXCEPTION and stop to FINISHED:ABORTED.

Decisions are built once per policy (``Policy.__post_init__``), so ``decide`` allocates nothing.
The only I/O is ``load_policy``, which reads a file and hands its text to ``parse_policy``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from schemas.codes import CODE_NAMES, TARGET_STATUS, Action, Code, JobStatus, Launcher, Stage
from schemas.events import (
    TRANSITION_SCHEMA,
    Cause,
    ExitEvent,
    Identifier,
    PolicyRef,
    Transition,
)

DEFAULT_RULE = "default"
MAX_NAME_CHARS = 128  # PolicyRef's limit: name, version and rule id are recorded with decisions
INT32 = (-(2**31), 2**31 - 1)  # the range of ExitEvent.return_code

T = TypeVar("T")
Operator = Literal["In", "NotIn"]
OPERATORS: tuple[Operator, ...] = ("In", "NotIn")
TOP_KEYS = ("name", "version", "default", "rules")
RULE_KEYS = ("id", "action", "codes", "values", "launchers", "sites", "stages", "status")
VALUES_KEYS = ("operator", "values")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the source, the rule and the problem."""


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueMatch:
    """A condition on the raw integer, like Kubernetes' ``onExitCodes``."""

    operator: Operator
    values: frozenset[int]

    def matches(self, value: int) -> bool:
        """True when ``value`` is (``In``) or is not (``NotIn``) one of ``values``."""
        return (value in self.values) is (self.operator == "In")


@dataclass(frozen=True)
class Rule:
    """One rule; a condition left as None is not checked, so no condition matches everything."""

    id: str
    action: Action
    codes: frozenset[Code] | None = None
    values: ValueMatch | None = None
    launchers: frozenset[Launcher] | None = None
    sites: frozenset[str] | None = None
    stages: frozenset[Stage] | None = None
    status: JobStatus | None = None  # where fail or stop leads; None: the action's default

    def matches(self, event: ExitEvent, code: Code, value: int) -> bool:
        """True when every condition this rule gives holds for the exit."""
        return (
            (self.codes is None or code in self.codes)
            and (self.values is None or self.values.matches(value))
            and (self.launchers is None or event.effective_launcher in self.launchers)
            and (self.sites is None or event.site in self.sites)
            and (self.stages is None or event.stage in self.stages)
        )

    @property
    def target_status(self) -> JobStatus | None:
        """The status this rule's fail or stop leads to; None for ignore."""
        return target_status(self.action, self.status)


def target_status(action: Action, status: JobStatus | None) -> JobStatus | None:
    """Where ``action`` leads: ``status`` when given, else the action's default; None: ignore."""
    if action is Action.IGNORE:
        return None
    return status or TARGET_STATUS[action]


@dataclass(frozen=True)
class Decision:
    """What a policy decided for one exit, and which rule of which policy decided it."""

    action: Action
    policy: PolicyRef
    target_status: JobStatus | None = None  # where a fail or stop moves the job; None: ignore


@dataclass(frozen=True)
class Policy:
    """A named, versioned list of rules and the action taken when none matches."""

    name: str
    version: str
    default: Action = Action.IGNORE
    rules: tuple[Rule, ...] = ()
    # Precompiled (rule, decision) pairs and the default decision: decide() only looks them up.
    _matchers: tuple[tuple[Rule, Decision], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _fallback: Decision = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        matchers = tuple(
            (rule, self._decision(rule.action, rule.id, rule.status)) for rule in self.rules
        )
        object.__setattr__(self, "_matchers", matchers)
        object.__setattr__(self, "_fallback", self._decision(self.default, DEFAULT_RULE, None))

    def _decision(self, action: Action, rule: str, status: JobStatus | None) -> Decision:
        ref = PolicyRef(name=self.name, version=self.version, rule=rule)
        return Decision(action, ref, target_status(action, status))


def decide(event: ExitEvent, policy: Policy) -> Decision:
    """The decision of the first rule that matches ``event``, else the policy's default."""
    code = event.effective_code
    value = int(code) if event.return_code is None else event.return_code
    for rule, decision in policy._matchers:
        if rule.matches(event, code, value):
            return decision
    return policy._fallback


def to_transition(event: ExitEvent, decision: Decision) -> Transition:
    """The transition a fail or stop decision sends on; it keeps the exit event's id.

    Built with ``model_construct``: every field comes from an already validated event and
    decision, and validating them again would be the classifier's largest cost.
    """
    assert decision.target_status is not None
    cause = Cause.model_construct(
        site=event.site,
        code=event.effective_code,
        return_code=event.return_code,
        reason=event.reason,
        launcher=event.effective_launcher,
        occurred_at=event.occurred_at,
    )
    return Transition.model_construct(
        schema_=TRANSITION_SCHEMA,
        event_id=event.event_id,
        job_id=event.job_id,
        action=decision.action,
        target_status=decision.target_status,
        cause=cause,
        policy=decision.policy,
    )


def transition_body(event: ExitEvent, decision: Decision) -> bytes:
    """The wire body of ``to_transition(event, decision)``, written directly.

    The classifier's hot path: building the two models only to serialise them took longer than
    parsing the exit. Every value comes from an already validated event and decision, so the
    body parses back to exactly ``to_transition``'s model (a property test holds them equal).
    """
    assert decision.target_status is not None
    cause: dict[str, object] = {"site": event.site, "code": event.effective_code.name}
    if event.return_code is not None:
        cause["return_code"] = event.return_code
    if event.reason is not None:
        cause["reason"] = event.reason
    cause["launcher"] = event.effective_launcher.value
    cause["occurred_at"] = event.occurred_at
    ref = decision.policy
    return orjson.dumps(
        {
            "schema": TRANSITION_SCHEMA,
            "event_id": event.event_id,
            "job_id": event.job_id,
            "action": decision.action.value,
            "target_status": decision.target_status.value,
            "cause": cause,
            "policy": {"name": ref.name, "version": ref.version, "rule": ref.rule},
        },
        option=orjson.OPT_UTC_Z,
    )


# -- the built-ins ----------------------------------------------------------------------------


def _builtin(name: str, fail_codes: Iterable[Code]) -> Policy:
    return Policy(
        name=name,
        version="1",
        default=Action.IGNORE,
        rules=(
            Rule("fail-on-exception", Action.FAIL, codes=frozenset(fail_codes)),
            Rule(
                "stop-on-abort", Action.STOP, codes=frozenset({Code.UNSAFE_COMPONENT, Code.ABORTED})
            ),
        ),
    )


_NOT_ZERO = ValueMatch("NotIn", frozenset({0}))
# What FLARE 2.9.0 itself does (DESIGN 2): its launcher turns every exit but 0 and 9 into 1,
# and the job then fails by the worker's stage alone (104 while starting, 101 once started).
NVFLARE_29 = Policy(
    name="nvflare-2.9",
    version="1",
    default=Action.IGNORE,
    rules=(
        Rule("stop-on-abort", Action.STOP, codes=frozenset({Code.ABORTED})),
        Rule(
            "failed-while-starting",
            Action.FAIL,
            values=_NOT_ZERO,
            stages=frozenset({Stage.STARTING}),
            status=JobStatus.FINISHED_ABNORMAL,
        ),
        Rule(
            "failed-while-running",
            Action.FAIL,
            values=_NOT_ZERO,
            stages=frozenset({Stage.STARTED}),
            status=JobStatus.FINISHED_EXECUTION_EXCEPTION,
        ),
        Rule(
            "fail-on-exception", Action.FAIL, codes=frozenset({Code.EXCEPTION, Code.CONFIG_ERROR})
        ),
        Rule(
            "infrastructure",
            Action.FAIL,
            codes=frozenset({Code.INFRASTRUCTURE_ERROR}),
            status=JobStatus.FINISHED_ABNORMAL,
        ),
        Rule("stop-on-unsafe", Action.STOP, codes=frozenset({Code.UNSAFE_COMPONENT})),
    ),
)
_NARROW_FAIL = (Code.EXCEPTION, Code.CONFIG_ERROR)
BUILTINS: dict[str, Policy] = {
    "nvflare-2.8": _builtin("nvflare-2.8", _NARROW_FAIL),
    "nvflare-2.8-legacy": _builtin("nvflare-2.8-legacy", (*_NARROW_FAIL, Code.EXECUTION_ERROR)),
    "nvflare-2.9": NVFLARE_29,
}


# -- reading TOML -----------------------------------------------------------------------------


class _Problem(Exception):
    """A problem found while parsing, before the source and rule are prefixed."""


def _refuse(where: str, problem: str) -> NoReturn:
    raise _Problem(f"{where}: {problem}")


def _one_of(choices: Iterable[str]) -> str:
    return ", ".join(choices)


def load_policy(spec: str) -> Policy:
    """A built-in policy by name, else the TOML policy file at path ``spec``."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    try:
        text = Path(spec).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            f"{spec}: no such file, and not a built-in policy ({_one_of(BUILTINS)})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{spec}: cannot read: {exc}") from exc
    return parse_policy(text, spec)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """The policy a TOML text describes; PolicyError naming ``source``, rule and problem."""
    try:
        return _policy(_toml(text))
    except _Problem as problem:
        raise PolicyError(f"{source}: {problem}") from None


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _refuse("not valid TOML", _with_position(str(exc), text))


def _with_position(message: str, text: str) -> str:
    """tomllib says "at end of document" for some errors; give the line and column instead."""
    lines = text.split("\n")
    where = f"at line {len(lines)}, column {len(lines[-1]) + 1}"
    return message.replace("at end of document", where)


def _policy(doc: dict[str, Any]) -> Policy:
    _no_unknown_keys(doc, TOP_KEYS, "policy")
    name = _label_text(doc.get("name"), "name")
    rules = _rules(doc.get("rules", []))
    return Policy(
        name=name,
        version=_version(doc.get("version")),
        default=_action(doc.get("default", Action.IGNORE.value), "default"),
        rules=rules,
    )


def _no_unknown_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            _refuse(f"unknown key {key!r}", f"{where} keys are {_one_of(allowed)}")


def _label_text(value: Any, where: str) -> str:
    if value is None:
        _refuse(where, "missing (required)")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        _refuse(where, f"{value!r} must be a string of 1 to {MAX_NAME_CHARS} characters")
    return value


def _version(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif value is not None and not isinstance(value, str):
        _refuse("version", f"{value!r} must be a string or an integer")
    return _label_text(value, "version")


def _action(value: Any, where: str) -> Action:
    if value is None:
        _refuse(where, "missing (required)")
    if value not in Action.__members__.values():
        _refuse(where, f"{value!r} is not one of {_one_of(Action)}")
    return Action(value)


def _rules(value: Any) -> tuple[Rule, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        _refuse("rules", "must be an array of tables ([[rules]])")
    rules = tuple(_rule(n, table) for n, table in enumerate(value, start=1))
    _unique_ids(rules)
    return rules


def _unique_ids(rules: Sequence[Rule]) -> None:
    seen: set[str] = set()
    for n, rule in enumerate(rules, start=1):
        label = f"rules[{n}] (id {rule.id!r}): id"
        if rule.id == DEFAULT_RULE:
            _refuse(label, f"{DEFAULT_RULE!r} is reserved for the policy's default action")
        if rule.id in seen:
            _refuse(label, "already used by an earlier rule (ids must be unique)")
        seen.add(rule.id)


def _rule(n: int, table: dict[str, Any]) -> Rule:
    label = f"rules[{n}]"
    if isinstance(table.get("id"), str):
        label += f" (id {table['id']!r})"
    try:
        return _rule_fields(n, table)
    except _Problem as problem:
        raise _Problem(f"{label}: {problem}") from None


def _rule_fields(n: int, table: dict[str, Any]) -> Rule:
    _no_unknown_keys(table, RULE_KEYS, "rule")
    action = _action(table.get("action"), "action")
    status = _optional(table, "status", _status)
    if status is not None and action is Action.IGNORE:
        _refuse("status", "an ignore rule leaves the job unchanged and has no status")
    return Rule(
        id=_label_text(table.get("id", f"rules[{n}]"), "id"),
        action=action,
        codes=_optional(table, "codes", _codes),
        values=_optional(table, "values", _value_match),
        launchers=_optional(table, "launchers", _launchers),
        sites=_optional(table, "sites", _sites),
        stages=_optional(table, "stages", _stages),
        status=status,
    )


def _optional(table: Mapping[str, Any], key: str, read: Callable[[Any], T]) -> T | None:
    return read(table[key]) if key in table else None


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        _refuse(where, "must be a non-empty array")
    return value


def _codes(value: Any) -> frozenset[Code]:
    for name in _list(value, "codes"):
        if not isinstance(name, str) or name not in CODE_NAMES:
            _refuse("codes", f"{name!r} is not one of {_one_of(c.name for c in Code)}")
    return frozenset(Code[name] for name in value)


def _launchers(value: Any) -> frozenset[Launcher]:
    for name in _list(value, "launchers"):
        if name not in Launcher.__members__.values():
            _refuse("launchers", f"{name!r} is not one of {_one_of(Launcher)}")
    return frozenset(Launcher(name) for name in value)


def _stages(value: Any) -> frozenset[Stage]:
    for name in _list(value, "stages"):
        if name not in Stage.__members__.values():
            _refuse("stages", f"{name!r} is not one of {_one_of(Stage)}")
    return frozenset(Stage(name) for name in value)


_RULE_STATUSES = [s for s in JobStatus if s.terminal and s is not JobStatus.FINISHED_COMPLETED]


def _status(value: Any) -> JobStatus:
    if value not in _RULE_STATUSES:
        _refuse("status", f"{value!r} is not one of {_one_of(_RULE_STATUSES)}")
    return JobStatus(value)


_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)


def _sites(value: Any) -> frozenset[str]:
    for site in _list(value, "sites"):
        try:
            _IDENTIFIER.validate_python(site)
        except ValidationError as exc:
            detail = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            _refuse("sites", f"{site!r} {detail}")
    return frozenset(value)


def _value_match(value: Any) -> ValueMatch:
    if not isinstance(value, dict):
        _refuse("values", 'must be a table: { operator = "In" | "NotIn", values = [integers] }')
    _no_unknown_keys(value, VALUES_KEYS, "values")
    operator = value.get("operator")
    if operator not in OPERATORS:
        _refuse("values.operator", f"{operator!r} is not one of {_one_of(OPERATORS)}")
    return ValueMatch(operator, _integers(value.get("values")))


def _integers(value: Any) -> frozenset[int]:
    low, high = INT32
    for number in _list(value, "values.values"):
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
            _refuse("values.values", f"{number!r} is not an integer from {low} to {high}")
    return frozenset(value)


# -- showing a policy -------------------------------------------------------------------------

UNCHANGED = "unchanged"


@dataclass(frozen=True)
class CodeRow:
    """What a policy does with one code reported alone (or with an integer outside the table)."""

    label: str
    decision: Decision


def code_table(policy: Policy) -> tuple[CodeRow, ...]:
    """One row per code of section 2a, then one for anything else (an unlisted integer).

    Each row is ``decide`` on a synthetic exit from a process launcher on a site no rule
    names, so rules that need another launcher or a named site show only in the rule table.
    """
    site = _neutral_site(policy)
    rows = [CodeRow(f"{c.name} ({c.value})", decide(_exit(site, code=c), policy)) for c in Code]
    unlisted = _unlisted_value(policy)
    other = decide(_exit(site, return_code=unlisted), policy)
    rows.append(CodeRow(f"anything else / unknown integers (e.g. {unlisted})", other))
    return tuple(rows)


def _exit(site: str, code: Code | None = None, return_code: int | None = None) -> ExitEvent:
    return ExitEvent(
        event_id="00000000-0000-0000-0000-000000000000",
        job_id="policy-show",
        site=site,
        code=code,
        return_code=return_code,
        occurred_at="1970-01-01T00:00:00Z",
    )


def _neutral_site(policy: Policy) -> str:
    named = set().union(*(rule.sites or () for rule in policy.rules))
    return next(site for site in (f"site-{n}" for n in count(1)) if site not in named)


def _unlisted_value(policy: Policy) -> int:
    """The first integer above the code table that no rule names."""
    named = set().union(*(rule.values.values for rule in policy.rules if rule.values))
    return next(value for value in count(max(Code) + 1) if value not in named)


def describe_policy(policy: Policy) -> str:
    """A readable description for ``policy show``: the rules, then the decision per code."""
    rules = [_rule_row(rule) for rule in policy.rules]
    default = target_status(policy.default, None)
    rules.append((DEFAULT_RULE, policy.default.value, _becomes(default), "no rule matched"))
    codes = [(row.label, *_decision_cells(row.decision)) for row in code_table(policy)]
    return "\n".join(
        [
            f"policy {policy.name} version {policy.version} (first matching rule wins)",
            "",
            *_table(("rule", "action", "job becomes", "conditions"), rules),
            "",
            "by code (a process launcher on a site no rule names):",
            *_table(("code", "decision", "job becomes", "rule"), codes),
        ]
    )


def _rule_row(rule: Rule) -> tuple[str, ...]:
    conditions = _conditions(rule) or "always"
    return (rule.id, rule.action.value, _becomes(rule.target_status), conditions)


def _decision_cells(decision: Decision) -> tuple[str, str, str]:
    return (decision.action.value, _becomes(decision.target_status), decision.policy.rule)


def _becomes(status: JobStatus | None) -> str:
    return UNCHANGED if status is None else status.value


def _conditions(rule: Rule) -> str:
    values = rule.values
    parts = [
        ("code", _code_names(rule)),
        (f"value {values.operator}", sorted(values.values)) if values else ("value", None),
        ("launcher", _launcher_names(rule)),
        ("site", _site_names(rule)),
        ("stage", _stage_names(rule)),
    ]
    return "; ".join(f"{key} {_words(items)}" for key, items in parts if items is not None)


def _code_names(rule: Rule) -> list[str] | None:
    return None if rule.codes is None else [c.name for c in sorted(rule.codes)]


def _launcher_names(rule: Rule) -> list[str] | None:
    launchers = rule.launchers
    return None if launchers is None else [la.value for la in Launcher if la in launchers]


def _site_names(rule: Rule) -> list[str] | None:
    return None if rule.sites is None else sorted(rule.sites)


def _stage_names(rule: Rule) -> list[str] | None:
    stages = rule.stages
    return None if stages is None else [st.value for st in Stage if st in stages]


def _words(items: Iterable[object]) -> str:
    return ", ".join(str(item) for item in items)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]


def policy_as_dict(policy: Policy) -> dict[str, Any]:
    """The policy as plain JSON data (``policy show --json``), with the decision per code."""
    return {
        "name": policy.name,
        "version": policy.version,
        "default": policy.default.value,
        "rules": [_rule_as_dict(rule) for rule in policy.rules],
        "by_code": [_code_row_as_dict(row) for row in code_table(policy)],
    }


def _rule_as_dict(rule: Rule) -> dict[str, Any]:
    values = rule.values
    return {
        "id": rule.id,
        "action": rule.action.value,
        "target_status": _status_or_none(rule.target_status),
        "codes": _code_names(rule),
        "values": values and {"operator": values.operator, "values": sorted(values.values)},
        "launchers": _launcher_names(rule),
        "sites": _site_names(rule),
        "stages": _stage_names(rule),
    }


def _code_row_as_dict(row: CodeRow) -> dict[str, Any]:
    action = row.decision.action
    return {
        "code": row.label,
        "action": action.value,
        "target_status": _status_or_none(row.decision.target_status),
        "rule": row.decision.policy.rule,
    }


def _status_or_none(status: JobStatus | None) -> str | None:
    return None if status is None else status.value
