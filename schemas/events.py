"""The three wire messages of DESIGN section 3, and the one way to read them.

Pydantic models are the single source of the contract: validation here, JSON Schema exported
from here (``schemas/json``). Every model is frozen and forbids unknown fields, because a new
field means a new schema version.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar
from uuid import UUID, SafeUUID

import jiter
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from schemas.codes import (
    CODE_NAMES,
    Action,
    Code,
    JobStatus,
    Launcher,
    Stage,
    code_for_value,
)

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 4096
MAX_SITES = 1000

EXIT_SCHEMA: Final = "exitpipe.exit/2"
EXIT_SCHEMA_V1: Final = "exitpipe.exit/1"  # the same without ``stage``; still accepted
LIFECYCLE_SCHEMA: Final = "exitpipe.lifecycle/1"
TRANSITION_SCHEMA: Final = "exitpipe.transition/1"

_IDENT_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


class BadMessage(ValueError):
    """A message that is not a valid event; ``reason`` names the field and the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENT_RE.fullmatch(value):
        raise ValueError("must be 1 to 128 characters of letters, digits, '.', '_', '-' and ':'")
    return value


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value
    if not isinstance(value, str) or not _RFC3339_RE.fullmatch(value):
        raise ValueError("must be an RFC 3339 time with an offset, e.g. 2026-01-31T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.upper())  # RFC 3339 allows 't' and 'z'
        except ValueError:
            raise ValueError(f"{value!r} is not a real date and time") from None
    if parsed.tzinfo is UTC:  # "Z": already the shared UTC object
        return parsed
    if not parsed.utcoffset():
        return parsed.replace(tzinfo=UTC)  # one shared UTC object keeps later normalising free
    try:
        parsed.astimezone(UTC)  # 0001-01-01T00:00:00+01:00 is before the first UTC datetime
    except OverflowError:
        raise ValueError(f"{value!r} is out of range once converted to UTC") from None
    return parsed


def _storable(value: str) -> str:
    # Both stores must hold every text the wire accepts: PostgreSQL refuses NUL in text, and
    # neither store can encode a lone surrogate as UTF-8.
    if "\x00" in value:
        raise ValueError("contains a NUL character, which the store cannot hold")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone surrogate, which is not text") from None
    return value


def _code_name(value: Any) -> Code:
    if isinstance(value, Code):
        return value
    if not isinstance(value, str) or value not in CODE_NAMES:
        raise ValueError(f"must be one of {', '.join(sorted(CODE_NAMES))}")
    return Code[value]


Identifier = Annotated[
    str,
    BeforeValidator(_identifier),
    WithJsonSchema({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}),
]
Timestamp = Annotated[
    datetime,
    BeforeValidator(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
CodeName = Annotated[
    Code,
    BeforeValidator(_code_name),
    PlainSerializer(lambda c: c.name, return_type=str),
    WithJsonSchema({"type": "string", "enum": [c.name for c in Code]}),
]
ReturnCode = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS), AfterValidator(_storable)]
Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_storable)]


class _Message(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True
    )

    def to_json(self) -> bytes:
        """The wire body: compact UTF-8 JSON, absent optionals left out."""
        return self.model_dump_json(exclude_none=True).encode()


class ExitEvent(_Message):
    """A worker exited on a client site (``exit.<site>`` on ``<ns>.events``)."""

    schema_: Literal["exitpipe.exit/2", "exitpipe.exit/1"] = Field(EXIT_SCHEMA, alias="schema")
    event_id: UUID
    job_id: Identifier
    site: Identifier
    launcher: Launcher | None = None
    code: CodeName | None = None
    return_code: ReturnCode | None = None
    reason: Reason | None = None
    stage: Stage | None = None
    occurred_at: Timestamp

    @model_validator(mode="after")
    def _code_or_return_code(self) -> ExitEvent:
        if self.code is None and self.return_code is None:
            raise ValueError("code: one of code and return_code must be given")
        if self.stage is not None and self.schema_ == EXIT_SCHEMA_V1:
            raise ValueError(f"stage: unknown field in {EXIT_SCHEMA_V1} (it came with exit/2)")
        return self

    @property
    def effective_code(self) -> Code:
        """The code policies match by name: ``code``, else the name of ``return_code``."""
        if self.code is not None:
            return self.code
        assert self.return_code is not None
        return code_for_value(self.return_code)

    @property
    def effective_launcher(self) -> Launcher:
        """The launcher, ``process`` when the event leaves it out."""
        return self.launcher or Launcher.PROCESS


class LifecycleEvent(_Message):
    """The server moved a job (``lifecycle.<status>`` on ``<ns>.jobs``)."""

    schema_: Literal["exitpipe.lifecycle/1"] = Field(LIFECYCLE_SCHEMA, alias="schema")
    event_id: UUID
    job_id: Identifier
    status: JobStatus
    sites: Annotated[list[Identifier], Field(max_length=MAX_SITES)] | None = None
    occurred_at: Timestamp


class Cause(_Message):
    """The exit that made a transition."""

    site: Identifier
    code: CodeName
    return_code: ReturnCode | None = None
    reason: Reason | None = None
    launcher: Launcher = Launcher.PROCESS
    occurred_at: Timestamp


class PolicyRef(_Message):
    """Which rule of which policy made a decision."""

    name: Label
    version: Label
    rule: Label


def _finished_not_completed(value: JobStatus) -> JobStatus:
    if not value.terminal or value is JobStatus.FINISHED_COMPLETED:
        raise ValueError("must be a FINISHED:* status other than FINISHED:COMPLETED")
    return value


def _fail_or_stop(value: Action) -> Action:
    if value is Action.IGNORE:
        raise ValueError("must be fail or stop")
    return value


class Transition(_Message):
    """The classifier's verdict for a reportable exit (``transition.<action>`` on ``<ns>.jobs``).

    ``event_id`` is the exit event's id, so a redelivered exit yields the same transition id.
    """

    schema_: Literal["exitpipe.transition/1"] = Field(TRANSITION_SCHEMA, alias="schema")
    event_id: UUID
    job_id: Identifier
    action: Annotated[Action, AfterValidator(_fail_or_stop)]
    # The rule's status (DESIGN 2): FINISHED:EXECUTION_EXCEPTION or FINISHED:ABORTED by default.
    target_status: Annotated[JobStatus, AfterValidator(_finished_not_completed)]
    cause: Cause
    policy: PolicyRef


Event = ExitEvent | LifecycleEvent | Transition
_M = TypeVar("_M", ExitEvent, LifecycleEvent, Transition, Cause, PolicyRef)
_V = TypeVar("_V")
MODELS: dict[str, type[ExitEvent] | type[LifecycleEvent] | type[Transition]] = {
    EXIT_SCHEMA: ExitEvent,
    EXIT_SCHEMA_V1: ExitEvent,
    LIFECYCLE_SCHEMA: LifecycleEvent,
    TRANSITION_SCHEMA: Transition,
}


def describe(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for err in error.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (a new field needs a new schema version)"
        if ": " in msg and not err["loc"]:
            field, msg = msg.split(": ", 1)
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)


def parse_object(obj: Any, accept: frozenset[str] | None = None) -> Event:
    """Validate one decoded JSON value; raise BadMessage naming the field and the reason."""
    if not isinstance(obj, dict):
        raise BadMessage("body: not a JSON object")
    schema = obj.get("schema")
    if schema is None:
        raise BadMessage("schema: missing")
    model = MODELS.get(schema) if isinstance(schema, str) else None
    if model is None or (accept is not None and schema not in accept):
        raise BadMessage(f"schema: unknown or unexpected schema {repr(schema)[:200]}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadMessage(describe(exc)) from exc
    except Exception as exc:  # a validator's bug must not stop a consumer: bad input
        raise BadMessage(f"body: cannot be read ({type(exc).__name__}: {exc})") from exc


_BOM = b"\xef\xbb\xbf"


def parse_body(body: bytes, accept: frozenset[str] | None = None) -> Event:
    """Read one wire body (size, UTF-8, JSON, schema); raise BadMessage on any problem.

    jiter (pydantic's own JSON parser) refuses what ``json.loads`` lets through or turns into
    other exceptions: duplicate keys (a second ``site`` would otherwise win silently), NaN and
    Infinity, numbers too large to hold, nesting deeper than 200, lone surrogates, trailing
    bytes. Whatever else goes wrong while reading is bad input too, never an exception that
    could stop a consumer.

    A body in the producers' own form takes the shortcut (``well_formed``) to the same event.
    """
    if len(body) > MAX_BODY_BYTES:
        raise BadMessage(f"body: {len(body)} bytes, over the limit of {MAX_BODY_BYTES}")
    event = well_formed(canonical_json(body))
    if event is not None and (accept is None or event.schema_ in accept):
        return event
    return parse_object(read_json(body), accept)


def read_json(body: bytes) -> Any:
    """Decode one JSON document; raise BadMessage naming the problem."""
    try:
        return jiter.from_json(body, allow_inf_nan=False, catch_duplicate_keys=True)
    except Exception as exc:
        raise BadMessage(_json_problem(body, exc)) from exc


def _json_problem(body: bytes, exc: Exception) -> str:
    if body.startswith(_BOM):
        return "body: starts with a byte-order mark, which JSON does not allow"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"body: not UTF-8 ({bad.reason} at byte {bad.start})"
    if "recursion limit" in str(exc):
        return f"body: not JSON (nested too deeply: {exc})"
    if "number out of range" in str(exc):
        return f"body: not JSON (a number too large to hold: {exc})"
    return f"body: not JSON ({exc})"


def json_schemas() -> dict[str, dict[str, Any]]:
    """The exported JSON Schema of each message, keyed by its file name in ``schemas/json``."""
    return {
        "exit.schema.json": ExitEvent.model_json_schema(by_alias=True),
        "lifecycle.schema.json": LifecycleEvent.model_json_schema(by_alias=True),
        "transition.schema.json": Transition.model_json_schema(by_alias=True),
    }


# -- the shortcut -------------------------------------------------------------------------------
#
# Nearly every body is what exitpipe's own producers wrote: compact JSON, each field in its
# plainest form. For those, reading with orjson and checking each field by hand, then building
# the model without pydantic's validation, gives the very event ``parse_object`` gives, in a
# fraction of the time (it was most of a replay's work). Anything else, a doubtful field
# included, is not taken: ``None`` sends it down the full path, which makes the event or names
# the problem, so the shortcut can only be faster, never different.
# tests/unit/test_shortcut.py holds it to that: whatever it builds equals what validation
# builds, for any input.

_EXIT_KEYS = frozenset(
    {
        "schema",
        "event_id",
        "job_id",
        "site",
        "launcher",
        "code",
        "return_code",
        "reason",
        "stage",
        "occurred_at",
    }
)
_LIFECYCLE_KEYS = frozenset({"schema", "event_id", "job_id", "status", "sites", "occurred_at"})
_TRANSITION_KEYS = frozenset(
    {"schema", "event_id", "job_id", "action", "target_status", "cause", "policy"}
)
_CAUSE_KEYS = frozenset({"site", "code", "return_code", "reason", "launcher", "occurred_at"})
_POLICY_REF_KEYS = frozenset({"name", "version", "rule"})
_ACTIONS = {Action.FAIL.value: Action.FAIL, Action.STOP.value: Action.STOP}
_BAD: Any = object()  # a field given, but not in its plainest form
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CODES = {c.name: c for c in Code}
_LAUNCHERS = {m.value: m for m in Launcher}
_STAGES = {m.value: m for m in Stage}
_STATUSES = {m.value: m for m in JobStatus}
_INT32 = range(-(2**31), 2**31)
_FIELDS_SET: dict[tuple[str, ...], frozenset[str]] = {}  # by the order of the body's keys
_FIELDS_SET_LIMIT = 256
_known_identifiers: set[str] = set()  # identifiers already checked (job ids, sites repeat)
# Small, and emptied when full: a daemon lives long and sees ever new job ids, and its memory
# must not grow with them (100,000 kept ids were a quarter of a daemon's RSS).
_KNOWN_LIMIT = 4096
_new_object = object.__new__
_set = object.__setattr__


def canonical_json(text: bytes) -> Any:
    """``text`` decoded, when it is JSON in orjson's own compact form; else None.

    Re-encoding must give back the very bytes, which leaves out every text the full reader
    might read differently (duplicate keys, escapes, spacing, numbers orjson rounds). orjson
    allows deeper nesting than the full reader: no event is nested, so ``well_formed`` leaves
    such a value to the full path, which refuses it.
    """
    try:
        obj = orjson.loads(text)
        if type(obj) is not dict or orjson.dumps(obj) != text:
            return None
    except (orjson.JSONDecodeError, TypeError):  # TypeError: too deep to encode again
        return None
    return obj


def well_formed(obj: Any) -> Event | None:
    """The event of a decoded body in its plainest form, built without validation; else None.

    A transition, the job-state consumer's usual input, is three models in one.
    """
    if type(obj) is not dict:
        return None
    schema = obj.get("schema")
    if schema in (EXIT_SCHEMA, EXIT_SCHEMA_V1):
        return _exit(obj, schema)
    if schema == LIFECYCLE_SCHEMA:
        return _lifecycle(obj)
    if schema == TRANSITION_SCHEMA:
        return _transition(obj)
    return None


def _exit(obj: dict[str, Any], schema: str) -> ExitEvent | None:
    if not _EXIT_KEYS.issuperset(obj):
        return None
    event_id, when = _event_id(obj.get("event_id")), _when(obj.get("occurred_at"))
    job_id, site = obj.get("job_id"), obj.get("site")
    if event_id is None or when is None or not _known(job_id) or not _known(site):
        return None
    code, return_code, launcher, reason = _plain(obj, "code", _code), *_details(obj)
    stage = _plain(obj, "stage", _stage)
    if _BAD in (code, return_code, launcher, reason, stage) or code is return_code is None:
        return None
    if stage is not None and schema != EXIT_SCHEMA:
        return None
    values = {
        "schema_": schema,
        "event_id": event_id,
        "job_id": job_id,
        "site": site,
        "launcher": launcher,
        "code": code,
        "return_code": return_code,
        "reason": reason,
        "stage": stage,
        "occurred_at": when,
    }
    return _built(ExitEvent, values, obj)


def _lifecycle(obj: dict[str, Any]) -> LifecycleEvent | None:
    if not _LIFECYCLE_KEYS.issuperset(obj):
        return None
    event_id, when = _event_id(obj.get("event_id")), _when(obj.get("occurred_at"))
    job_id, status = obj.get("job_id"), _member(_STATUSES, obj.get("status"))
    if event_id is None or when is None or status is None or not _known(job_id):
        return None
    sites = obj.get("sites")
    if sites is not None:
        if type(sites) is not list or len(sites) > MAX_SITES or not all(map(_known, sites)):
            return None
        sites = list(sites)
    values = {
        "schema_": LIFECYCLE_SCHEMA,
        "event_id": event_id,
        "job_id": job_id,
        "status": status,
        "sites": sites,
        "occurred_at": when,
    }
    return _built(LifecycleEvent, values, obj)


def _transition(obj: dict[str, Any]) -> Transition | None:
    if obj.keys() != _TRANSITION_KEYS:  # every field of a transition is required
        return None
    event_id, job_id = _event_id(obj["event_id"]), obj["job_id"]
    action, target = _member(_ACTIONS, obj["action"]), _member(_STATUSES, obj["target_status"])
    if event_id is None or not _known(job_id) or action is None or target is None:
        return None
    if not target.terminal or target is JobStatus.FINISHED_COMPLETED:
        return None
    cause, policy = _cause(obj["cause"]), _policy_ref(obj["policy"])
    if cause is None or policy is None:
        return None
    values = {
        "schema_": TRANSITION_SCHEMA,
        "event_id": event_id,
        "job_id": job_id,
        "action": action,
        "target_status": target,
        "cause": cause,
        "policy": policy,
    }
    return _built(Transition, values, obj)


def _cause(obj: Any) -> Cause | None:
    if type(obj) is not dict or not _CAUSE_KEYS.issuperset(obj):
        return None
    site, code = obj.get("site"), _code(obj.get("code"))
    when = _when(obj.get("occurred_at"))
    if not _known(site) or code is None or when is None:
        return None
    return_code, launcher, reason = _details(obj)
    if _BAD in (return_code, launcher, reason):
        return None
    if launcher is None:
        launcher = Launcher.PROCESS
    values = {
        "site": site,
        "code": code,
        "return_code": return_code,
        "reason": reason,
        "launcher": launcher,
        "occurred_at": when,
    }
    return _built(Cause, values, obj)


def _details(obj: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The optional ``return_code``, ``launcher`` and ``reason`` of an exit or a cause."""
    return (
        _plain(obj, "return_code", _int32),
        _plain(obj, "launcher", _launcher),
        _plain(obj, "reason", _text),
    )


def _plain(obj: dict[str, Any], name: str, read: Callable[[Any], Any]) -> Any:
    """``obj[name]`` as ``read`` makes it; None when absent, _BAD when not in its plainest form."""
    if name not in obj:
        return None
    value = read(obj[name])
    return _BAD if value is None else value


def _int32(value: Any) -> int | None:
    return value if type(value) is int and value in _INT32 else None


def _code(value: Any) -> Code | None:
    return _member(_CODES, value)


def _launcher(value: Any) -> Launcher | None:
    return _member(_LAUNCHERS, value)


def _stage(value: Any) -> Stage | None:
    return _member(_STAGES, value)


def _policy_ref(obj: Any) -> PolicyRef | None:
    if type(obj) is not dict or obj.keys() != _POLICY_REF_KEYS:
        return None
    name, version, rule = _label(obj["name"]), _label(obj["version"]), _label(obj["rule"])
    if name is None or version is None or rule is None:
        return None
    return _built(PolicyRef, {"name": name, "version": version, "rule": rule}, obj)


def _label(value: Any) -> str | None:
    if type(value) is not str or not 1 <= len(value) <= 128:
        return None
    return _text(value)


def _built(model: type[_M], values: dict[str, Any], given: dict[str, Any]) -> _M:
    # What pydantic's own validation leaves on an instance of these models: no extras (they
    # are forbidden), no private attributes, the fields given (by name, not alias).
    made = _new_object(model)
    _set(made, "__dict__", values)
    names = tuple(given)
    fields_set = _FIELDS_SET.get(names)
    if fields_set is None:
        fields_set = frozenset("schema_" if k == "schema" else k for k in names)
        if len(_FIELDS_SET) < _FIELDS_SET_LIMIT:  # key orders are the sender's to choose
            _FIELDS_SET[names] = fields_set
    _set(made, "__pydantic_fields_set__", set(fields_set))
    _set(made, "__pydantic_extra__", None)
    _set(made, "__pydantic_private__", None)
    return made


def _event_id(value: Any) -> UUID | None:
    if type(value) is not str or not _UUID_RE.fullmatch(value):
        return None
    # What UUID(value) makes, without its parsing of every other spelling (a third of the
    # shortcut's time): the canonical form's 32 hex digits are the integer.
    made = _new_object(UUID)
    _set(made, "int", int(value.replace("-", ""), 16))
    _set(made, "is_safe", SafeUUID.unknown)
    return made


def _when(value: Any) -> datetime | None:
    if type(value) is not str:
        return None
    try:
        parsed: datetime = _rfc3339(value)
    except ValueError:
        return None
    return parsed


def _member(table: dict[str, _V], value: Any) -> _V | None:
    return table.get(value) if type(value) is str else None


def _known(value: Any) -> bool:
    if type(value) is not str:
        return False
    if value in _known_identifiers:
        return True
    if not _IDENT_RE.fullmatch(value):
        return False
    if len(_known_identifiers) >= _KNOWN_LIMIT:
        _known_identifiers.clear()
    _known_identifiers.add(value)
    return True


def _text(value: Any) -> str | None:
    if type(value) is not str or len(value) > MAX_REASON_CHARS:
        return None
    try:
        return _storable(value)
    except ValueError:
        return None
