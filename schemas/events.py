"""The three wire messages of DESIGN section 3, and the one way to read them.

Pydantic models are the single source of the contract: validation here, JSON Schema exported
from here (``schemas/json``). Every model is frozen and forbids unknown fields, because a new
field means a new schema version.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from uuid import UUID

import jiter
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
    """
    if len(body) > MAX_BODY_BYTES:
        raise BadMessage(f"body: {len(body)} bytes, over the limit of {MAX_BODY_BYTES}")
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
