"""The wire contract between runner pods and the operator's run API (issue 10, DESIGN.md §1).

Runner pods hold no database credentials and no Kubernetes API rights: they report through the
run API the operator serves over TLS, authenticated by a projected ServiceAccount token bound to
the pod, with the audience ``TOKEN_AUDIENCE`` (the apiserver does not accept it). Every request
names the run it reports on (``RunRef``); the operator maps the token's pod -> Job -> schedule and
answers 403 to anything else.

    POST START_PATH     StartRequest    -> 200 Grant | 409 ApiError (no budget: spend nothing)
    POST PROGRESS_PATH  ProgressReport  -> 200 Ack
    POST FINISH_PATH    FinishReport    -> 200 Ack   (idempotent per Job UID + pod UID)
    POST CHECKPOINT_PATH CheckpointReport -> 200 Ack (the Job's transcript after a step)

A retry of a Job (a new pod, the same Job UID) gets the Job's last checkpoint with its grant
(``Grant.resume``) and goes on from the step after it: the paid steps are not paid again.

Money is a decimal string on the wire and ``Decimal`` in Python, never a float. This module
depends on pydantic and the standard library only: the operator imports it (the import contract
allows ``agent_runner.contract`` and nothing else of the runner's agent).
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
)

__all__ = [
    "CHECKPOINT_LIMIT_BYTES",
    "CHECKPOINT_PATH",
    "FINAL_OUTCOMES",
    "FINISH_ALERT_REASON_MAX_CHARS",
    "FINISH_ERROR_MAX_CHARS",
    "FINISH_OUTPUT_MAX_CHARS",
    "FINISH_PATH",
    "MAX_USD",
    "PROGRESS_PATH",
    "RUN_API_VERSION",
    "START_PATH",
    "STATE_LIMIT_BYTES",
    "STATE_OUTPUT_LIMIT_BYTES",
    "TOKEN_AUDIENCE",
    "USD_CAP_PATTERN",
    "USD_PER_RUN_PATTERN",
    "USD_QUANTUM",
    "Ack",
    "ApiError",
    "Checkpoint",
    "CheckpointReport",
    "FinishReport",
    "Grant",
    "ModelPrice",
    "NoGrantReason",
    "PreviousRun",
    "ProgressReport",
    "ProviderName",
    "RunOutcome",
    "RunRef",
    "StartRequest",
    "StateTooLargeError",
    "ToolCallBrief",
    "TranscriptMessage",
    "TranscriptToolCall",
    "describe_validation_error",
    "grant_usd",
    "quantize_usd",
    "storable_text",
    "usd_text",
    "validate_state",
]

RUN_API_VERSION = "v1"
TOKEN_AUDIENCE = "nocturne.dev/run-api"  # noqa: S105 - an audience name, not a secret
TOKEN_DIR = "/var/run/secrets/nocturne.dev/run-api"  # noqa: S105 - where the token is mounted
TOKEN_FILE = "token"  # noqa: S105 - its file name there
ENV_TASK = "NOCTURNE_TASK"
"""The Job template's variable holding the task snapshot (the runner runs it, the run API reads
the caps from it)."""
ENV_MANUAL_REQUEST = "NOCTURNE_MANUAL_REQUEST"
"""Set on run-now Jobs: the request id (the run API records it with the run)."""
"""The audience of the runner's projected token: only the run API accepts it."""
START_PATH = "/v1/runs/start"
PROGRESS_PATH = "/v1/runs/progress"
FINISH_PATH = "/v1/runs/finish"
CHECKPOINT_PATH = "/v1/runs/checkpoint"
CHECKPOINT_LIMIT_BYTES = 2 * 1024 * 1024
"""Largest checkpoint (its JSON); the runner skips a larger one (a retry resumes from the one
before) rather than have it refused."""

ProviderName = Literal["openai", "anthropic", "offline"]


class RunOutcome(StrEnum):
    """How a run attempt ended, RUNNING until it has: the one spelling of a run's outcome. Its
    value is what the wire, the summary and the database carry (``SUCCEEDED``); ``display`` is
    what status, notices and people read (``Succeeded``, ``BudgetExceeded``); ``metric`` is the
    Prometheus label (``budget_exceeded``)."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"

    @property
    def display(self) -> str:
        """``BudgetExceeded``: how status and notices spell it."""
        return "".join(word.capitalize() for word in self.value.split("_"))

    @property
    def metric(self) -> str:
        """``budget_exceeded``: the Prometheus label value."""
        return self.value.lower()

    @property
    def final(self) -> bool:
        """Every outcome but RUNNING is final."""
        return self is not RunOutcome.RUNNING


FINAL_OUTCOMES = tuple(outcome for outcome in RunOutcome if outcome.final)

NoGrantReason = Literal[
    "BudgetExhausted", "MonthlyBudgetReached", "TotalBudgetReached", "NamespaceBudgetReached"
]

# --------------------------------------------------------------------------------------------
# Money: stored as NUMERIC(14, 6); every amount rounds *up* to the micro-dollar.

USD_QUANTUM = Decimal("0.000001")
MAX_USD = Decimal("99999999.999999")  # NUMERIC(14, 6)
MAX_TOKENS = 2**63 - 1  # BIGINT
MAX_EXECUTION_ID = 2**63 - 1  # BIGINT: a larger id is no row, not a database error
_USD_TEXT = re.compile(r"^[0-9]{1,8}(\.[0-9]{1,6})?$")


def quantize_usd(value: Decimal) -> Decimal:
    """Round a USD amount spent up to the one quantum (6 decimals: the CRD's, the ledger's, the
    wire's, the database's): a recorded cost never under-reports the spend, and a cost within a
    budget of at most 6 decimals stays within it."""
    return value.quantize(USD_QUANTUM, rounding=ROUND_CEILING)


def grant_usd(value: Decimal) -> Decimal:
    """Round a USD amount that may be spent down to the quantum: a grant never exceeds what a
    cap leaves. The one rule: what was spent rounds up, what may be spent rounds down."""
    return value.quantize(USD_QUANTUM, rounding=ROUND_FLOOR)


def _usd_from_wire(value: object) -> Decimal:
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError("must be a finite amount >= 0")
        return value
    if not isinstance(value, str) or not _USD_TEXT.fullmatch(value):
        raise ValueError('must be a non-negative decimal string such as "0.25" (never a float)')
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise ValueError("must be a decimal string") from None


def usd_text(amount: Decimal) -> str:
    """``amount`` as a plain decimal, exact and without trailing zeros, for the wire, logs and
    messages: ``str()`` prints ``Decimal("0E-6")`` as ``0E-6`` and ``4.000E-7`` as such."""
    text = format(amount.normalize(), "f")
    return "0" if text == "-0" else text


USD = Annotated[
    Decimal,
    BeforeValidator(_usd_from_wire),
    Field(ge=0, le=MAX_USD),
    PlainSerializer(usd_text, return_type=str),
]
"""A USD amount: a decimal string on the wire, ``Decimal`` in Python."""
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]

# --------------------------------------------------------------------------------------------
# Agent state carried from one run to the next.

STATE_LIMIT_BYTES = 64 * 1024
"""Largest agent state, measured as compact UTF-8 JSON."""
STATE_OUTPUT_LIMIT_BYTES = 256 * 1024
"""Largest previous-run output kept with the agent state (UTF-8 bytes)."""
# An escaped NUL in JSON text, not preceded by an escaping backslash (`\\u0000` is text).
_JSON_NUL_RE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class StateTooLargeError(ValueError):
    """Agent state or its output is over the size limit, or is not storable JSON."""


def compact_json(value: Any) -> str:
    """The JSON text PostgreSQL stores (no NaN, no spaces)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_document(name: str, value: Any, error: type[ValueError] = ValueError) -> str:
    """Serialise a JSONB value or raise ``error`` saying why PostgreSQL could not store it."""
    try:
        text = compact_json(value)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise error(f"{name} is not storable JSON: {exc}") from None
    if _JSON_NUL_RE.search(text):
        raise error(
            f"{name} contains a NUL character (\\u0000), which PostgreSQL JSONB cannot store"
        )
    return text


def storable_text(text: str) -> str:
    """``text`` as JSONB and UTF-8 can hold it: NUL becomes U+FFFD, a lone surrogate "?" (for
    texts the runner writes into a report from what a model or a page sent)."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def validate_state(state: Any, output: str | None = None, *, what: str = "agent state") -> None:
    """Raise StateTooLargeError unless ``state`` is storable JSON within STATE_LIMIT_BYTES and
    ``output`` is within STATE_OUTPUT_LIMIT_BYTES (both as UTF-8)."""
    size = len(json_document(what, state, StateTooLargeError).encode("utf-8"))
    if size > STATE_LIMIT_BYTES:
        raise StateTooLargeError(
            f"{what} is {size} bytes as compact JSON; the limit is {STATE_LIMIT_BYTES} bytes"
        )
    if output is not None:
        out_size = len(output.encode("utf-8", "replace"))
        if out_size > STATE_OUTPUT_LIMIT_BYTES:
            raise StateTooLargeError(
                f"{what}: output is {out_size} bytes; the limit is {STATE_OUTPUT_LIMIT_BYTES} bytes"
            )
        if "\x00" in output:
            raise StateTooLargeError(f"{what}: output contains a NUL character")


# --------------------------------------------------------------------------------------------
# Errors in the house format: ``field value: rule``.

_VALUE_PREVIEW = 80


def describe_validation_error(
    exc: ValidationError, *, prefix: str = "", secret_fields: frozenset[str] = frozenset()
) -> str:
    """One line per error: ``field value: rule``. Values of secret fields, and whole documents
    (missing fields, model-level errors), are never echoed."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "document"
        if err["type"] == "missing":
            lines.append(f"{field}: is required")
            continue
        if not err["loc"] or any(str(part) in secret_fields for part in err["loc"]):
            lines.append(f"{field}: {err['msg']}")
            continue
        lines.append(f"{field} {preview(err['input'])}: {err['msg']}")
    return "; ".join(lines)


def preview(value: object) -> str:
    """``value`` as short JSON for an error message."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) > _VALUE_PREVIEW:
        text = text[: _VALUE_PREVIEW - 3] + "..."
    return text


# --------------------------------------------------------------------------------------------
# The task document: the snapshot of a schedule's spec each Job carries (env NOCTURNE_TASK).
# ``nocturne_operator.render.task_document()`` writes it; the runner runs it; the run API reads
# its caps, model and zone from the Job, never from the runner's word.

TASK_DOCUMENT_VERSION = 1
RESTRICTED_OPERATIONS = ("send_email", "purchase", "delete_data", "change_permissions")
TOOLS = ("web_fetch", *RESTRICTED_OPERATIONS)

ToolName = Literal["web_fetch", "send_email", "purchase", "delete_data", "change_permissions"]
RestrictedOperation = Literal["send_email", "purchase", "delete_data", "change_permissions"]

USD_PER_RUN_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,6})?$"
"""``spec.budget.maxPerRunUSD`` as the CRD, the operator's model and the task snapshot take it."""
USD_CAP_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,6})?$"
"""``maxTotalUSD`` and ``maxMonthlyUSD``: the same, with more whole dollars."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ScheduleIdentity(_Model):
    """The AgentSchedule this run belongs to."""

    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1)
    uid: str = Field(min_length=1)


class TaskSpec(_Model):
    """What the agent does."""

    query: str = Field(min_length=1)
    context: dict[str, Any] = Field(default_factory=dict)
    state_key: str | None = Field(None, alias="stateKey", min_length=1, max_length=128)


class AgentSpec(_Model):
    """Model, provider and the tools the agent may use."""

    model: str = Field(min_length=1, max_length=128)
    provider: ProviderName
    base_url: str = Field("", alias="baseURL")
    tools: tuple[ToolName, ...] = ()
    allow_restricted_operations: tuple[RestrictedOperation, ...] = Field(
        (), alias="allowRestrictedOperations"
    )
    max_steps: int = Field(alias="maxSteps", ge=1, le=100)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and (
            not value.startswith(("http://", "https://"))
            or not value.split("://", 1)[1]
            or any(ch.isspace() for ch in value)
        ):
            raise ValueError("must be empty or an http(s) URL without spaces")
        return value


class BudgetSpec(_Model):
    """USD caps as ``Decimal``, parsed from decimal strings (never floats)."""

    max_per_run_usd: Decimal = Field(alias="maxPerRunUSD")
    max_total_usd: Decimal | None = Field(None, alias="maxTotalUSD")
    max_monthly_usd: Decimal | None = Field(None, alias="maxMonthlyUSD")

    @field_validator("max_per_run_usd", "max_total_usd", "max_monthly_usd", mode="before")
    @classmethod
    def _decimal_string(cls, value: object, info: ValidationInfo) -> object:
        if value is None and info.field_name != "max_per_run_usd":
            return None
        pattern = USD_PER_RUN_PATTERN if info.field_name == "max_per_run_usd" else USD_CAP_PATTERN
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            # pydantic reports ValueError (not TypeError) as a field error.
            raise ValueError('must be a non-negative decimal string such as "2.00"')
        return Decimal(value)


class TaskDocument(_Model):
    """``task.json`` as rendered by the operator (version 1)."""

    version: Literal[1]
    schedule: ScheduleIdentity
    task: TaskSpec
    agent: AgentSpec
    budget: BudgetSpec
    timeout_seconds: int = Field(alias="timeoutSeconds", ge=1)
    time_zone: str = Field("UTC", alias="timeZone", min_length=1)


def parse_task_document(text: str | bytes) -> TaskDocument:
    """The task document from JSON text; ValueError naming the field and the rule."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"task document: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - callers report every bad document alike
            f"task document: must be a JSON object, got {type(data).__name__}"
        )
    version = data.get("version")
    if version != TASK_DOCUMENT_VERSION:
        raise ValueError(
            f"task document version {preview(version)}: this runner understands version "
            f"{TASK_DOCUMENT_VERSION} only (operator and runner images out of step?)"
        )
    try:
        return TaskDocument.model_validate(data)
    except ValidationError as exc:
        raise ValueError(
            f"task document: {describe_validation_error(exc, prefix='task document field ')}"
        ) from None


# --------------------------------------------------------------------------------------------
# The run API's documents.


class _Wire(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


_UID = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9-]+$")]
_NAME = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


class ModelPrice(_Wire):
    """What one model costs (USD per million tokens) and how many tokens one response may
    carry. The operator owns the price table and puts the run's price into its grant."""

    provider: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=128)
    input_usd_per_mtok: USD = Field(alias="inputUSDPerMTok")
    output_usd_per_mtok: USD = Field(alias="outputUSDPerMTok")
    max_output_tokens: int = Field(alias="maxOutputTokens", ge=1, le=10_000_000)

    @property
    def input_usd_per_token(self) -> Decimal:
        """Exact (unrounded) USD per input token."""
        return self.input_usd_per_mtok / 1_000_000

    @property
    def output_usd_per_token(self) -> Decimal:
        """Exact (unrounded) USD per output token."""
        return self.output_usd_per_mtok / 1_000_000


class RunRef(_Wire):
    """The run a request reports on: the schedule (by namespace, name and UID), the Job and the
    pod. The operator checks it against the pod the caller's token is bound to."""

    namespace: _NAME
    schedule: _NAME
    schedule_uid: _UID = Field(alias="scheduleUID")
    job_uid: _UID = Field(alias="jobUID")
    pod_uid: _UID = Field(alias="podUID")


class StartRequest(_Wire):
    """An attempt starts: reserve its budget and hand over what it needs."""

    run: RunRef
    started_at: AwareDatetime = Field(alias="startedAt")


class PreviousRun(_Wire):
    """What the schedule's last successful run saved for this one (``task.stateKey``)."""

    state: Any = None
    output: str | None = None


class TranscriptToolCall(_Wire):
    """A tool call in a checkpointed transcript, as the model made it."""

    id: str = Field(max_length=512)
    name: str = Field(max_length=256)
    arguments: dict[str, Any] = Field(default_factory=dict)
    arguments_error: str | None = Field(None, alias="argumentsError", max_length=4096)
    raw_arguments: str | None = Field(None, alias="rawArguments", max_length=1024 * 1024)


class TranscriptMessage(_Wire):
    """One turn of a checkpointed transcript."""

    role: Literal["system", "user", "assistant", "tool"]
    text: str = Field("", max_length=1024 * 1024)
    tool_calls: tuple[TranscriptToolCall, ...] = Field((), alias="toolCalls", max_length=64)
    tool_call_id: str | None = Field(None, alias="toolCallId", max_length=512)
    is_error: bool = Field(False, alias="isError")


class ToolCallBrief(_Wire):
    """One tool call in brief, for people reading a run (``nocturne show``): the tool, what it
    was aimed at (a host, never a query string or a body) and whether it worked."""

    step: int = Field(ge=0, le=10_000)
    tool: str = Field(max_length=128)
    target: str | None = Field(None, max_length=256)
    ok: bool


class Checkpoint(_Wire):
    """A Job's run after its ``step``-th completed model call: the conversation so far, the
    cost of every attempt until then, and what a person reads about the steps. A retry of the
    Job resumes from it."""

    step: int = Field(ge=1, le=10_000)
    messages: tuple[TranscriptMessage, ...] = Field(min_length=1, max_length=1_000)
    cost_usd: USD = Field(alias="costUSD")
    input_tokens: Tokens = Field(alias="inputTokens")
    output_tokens: Tokens = Field(alias="outputTokens")
    tool_calls: tuple[ToolCallBrief, ...] = Field((), alias="toolCalls", max_length=1_000)
    refusals: tuple[dict[str, Any], ...] = Field((), max_length=1_000)


class CheckpointReport(_Wire):
    """After a completed step: keep the Job's transcript (a later step's replaces it; an
    earlier or equal one is ignored)."""

    run: RunRef
    execution_id: int = Field(alias="executionId", ge=1, le=MAX_EXECUTION_ID)
    checkpoint: Checkpoint

    @field_validator("checkpoint")
    @classmethod
    def _storable(cls, value: Checkpoint) -> Checkpoint:
        text = json_document("checkpoint", value.model_dump(mode="json"))
        if len(text.encode("utf-8")) > CHECKPOINT_LIMIT_BYTES:
            raise ValueError(f"the checkpoint is over {CHECKPOINT_LIMIT_BYTES} bytes as JSON")
        return value


class Grant(_Wire):
    """The operator's answer to a start: this attempt may spend at most ``limit_usd``.

    The limit is already lowered to what the per-run cap leaves after the Job's earlier
    attempts, and to what the total and monthly caps leave after every other Job's spend and
    in-flight reservation. Prices come with it: runners carry no price table. ``resume`` is
    the Job's last checkpoint, when an earlier attempt of the Job left one."""

    execution_id: int = Field(alias="executionId", ge=1)
    attempt: int = Field(ge=0)
    limit_usd: USD = Field(alias="limitUSD")
    spent_before_usd: USD = Field(Decimal(0), alias="spentBeforeUSD")
    price: ModelPrice
    previous: PreviousRun | None = None
    resume: Checkpoint | None = None


class ProgressReport(_Wire):
    """Cost so far (cumulative for this attempt, never lower than an earlier report), and what
    the call about to be made may cost at most (``reservedUSD``; 0 between calls): an attempt
    killed during that call is charged it."""

    run: RunRef
    execution_id: int = Field(alias="executionId", ge=1, le=MAX_EXECUTION_ID)
    cost_usd: USD = Field(alias="costUSD")
    reserved_usd: USD = Field(Decimal(0), alias="reservedUSD")
    input_tokens: Tokens = Field(alias="inputTokens")
    output_tokens: Tokens = Field(alias="outputTokens")
    steps: int = Field(0, ge=0, le=10_000)
    # What the runner does now ("model call 3/8", "web_fetch example.com"): status shows it.
    activity: str | None = Field(None, max_length=200)


# FinishReport text limits; the runner clips to them, since one field over its limit would
# refuse the whole report.
FINISH_OUTPUT_MAX_CHARS = 4 * 1024 * 1024
FINISH_ERROR_MAX_CHARS = 256 * 1024
FINISH_ALERT_REASON_MAX_CHARS = 4096


class FinishReport(_Wire):
    """An attempt's final record; replaying it changes nothing (the first final status wins)."""

    run: RunRef
    execution_id: int = Field(alias="executionId", ge=1, le=MAX_EXECUTION_ID)
    status: RunOutcome
    completed_at: AwareDatetime = Field(alias="completedAt")
    cost_usd: USD = Field(alias="costUSD")
    input_tokens: Tokens = Field(alias="inputTokens")
    output_tokens: Tokens = Field(alias="outputTokens")
    output: str | None = Field(None, max_length=FINISH_OUTPUT_MAX_CHARS)
    error: str | None = Field(None, max_length=FINISH_ERROR_MAX_CHARS)
    alert: bool = False
    alert_reason: str | None = Field(
        None, alias="alertReason", max_length=FINISH_ALERT_REASON_MAX_CHARS
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Saved for the next run when the status is SUCCEEDED (with ``output``).
    state: Any = None

    @field_validator("status")
    @classmethod
    def _final(cls, value: RunOutcome) -> RunOutcome:
        if not value.final:
            raise ValueError(
                f"a final report's status must be one of {[o.value for o in FINAL_OUTCOMES]}"
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        # JSONB holds no NUL and no NaN: refused here, not as a database error after the read.
        json_document("metadata", value)
        return value


class Ack(_Wire):
    """A report was recorded (or had been already)."""

    recorded: bool = True


class ApiError(_Wire):
    """Every non-200 answer: a CamelCase reason and a message naming the field and the rule."""

    reason: str = Field(max_length=64)
    message: str = Field(max_length=4096)
