"""The three wire messages of DESIGN section 3, and the one way to read them.

Pydantic models are the single source of the contract: validation here, JSON Schema exported
from here (``schemas/json``). Every model is frozen and forbids unknown fields, because a new
field means a new schema version.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from uuid import UUID

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
    TARGET_STATUS,
    Action,
    Code,
    JobStatus,
    Launcher,
    code_for_value,
)

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 4096
MAX_SITES = 1000

EXIT_SCHEMA: Final = "exitpipe.exit/1"
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
    # Zero offsets share the one UTC object, which keeps later normalisation free.
    return parsed if parsed.utcoffset() else parsed.replace(tzinfo=UTC)


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
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS)]


class _Message(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True
    )

    def to_json(self) -> bytes:
        """The wire body: compact UTF-8 JSON, absent optionals left out."""
        return self.model_dump_json(exclude_none=True).encode()


class ExitEvent(_Message):
    """A worker exited on a client site (``exit.<site>`` on ``<ns>.events``)."""

    schema_: Literal["exitpipe.exit/1"] = Field(EXIT_SCHEMA, alias="schema")
    event_id: UUID
    job_id: Identifier
    site: Identifier
    launcher: Launcher | None = None
    code: CodeName | None = None
    return_code: ReturnCode | None = None
    reason: Reason | None = None
    occurred_at: Timestamp

    @model_validator(mode="after")
    def _code_or_return_code(self) -> ExitEvent:
        if self.code is None and self.return_code is None:
            raise ValueError("code: one of code and return_code must be given")
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

    name: Annotated[str, Field(min_length=1, max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=128)]
    rule: Annotated[str, Field(min_length=1, max_length=128)]


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
    target_status: JobStatus
    cause: Cause
    policy: PolicyRef

    @model_validator(mode="after")
    def _target_matches_action(self) -> Transition:
        expected = TARGET_STATUS[self.action]
        if self.target_status is not expected:
            raise ValueError(f"target_status: must be {expected.value} for action {self.action}")
        return self


Event = ExitEvent | LifecycleEvent | Transition
MODELS: dict[str, type[ExitEvent] | type[LifecycleEvent] | type[Transition]] = {
    EXIT_SCHEMA: ExitEvent,
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
        raise BadMessage(f"schema: unknown or unexpected schema {schema!r}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadMessage(describe(exc)) from exc


_MARKERS = tuple((f'"schema":"{name}"'.encode(), name, model) for name, model in MODELS.items())


def parse_body(body: bytes, accept: frozenset[str] | None = None) -> Event:
    """Read one wire body (size, UTF-8, JSON, schema); raise BadMessage on any problem."""
    if len(body) > MAX_BODY_BYTES:
        raise BadMessage(f"body: {len(body)} bytes, over the limit of {MAX_BODY_BYTES}")
    # Fast path for the compact JSON our producers write: pydantic reads the bytes in one
    # pass. Any failure falls through to the careful path below, which names the problem;
    # a marker found elsewhere in the body cannot fool it, the Literal schema field is checked.
    for marker, name, model in _MARKERS:
        if marker in body and (accept is None or name in accept):
            try:
                return model.model_validate_json(body)
            except ValueError:
                break
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessage(f"body: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadMessage(f"body: not JSON ({exc.msg} at {where})") from exc
    except RecursionError as exc:
        raise BadMessage("body: not JSON (nested too deeply)") from exc
    return parse_object(obj, accept)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The exported JSON Schema of each message, keyed by its file name in ``schemas/json``."""
    return {
        "exit.schema.json": ExitEvent.model_json_schema(by_alias=True),
        "lifecycle.schema.json": LifecycleEvent.model_json_schema(by_alias=True),
        "transition.schema.json": Transition.model_json_schema(by_alias=True),
    }
