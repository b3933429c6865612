"""The runner's inputs: the task document the operator renders (``$NOCTURNE_TASK_FILE``) and the
pod's environment.

The task model mirrors ``nocturne_operator.render.task_document()`` field for field (a unit test
renders one and parses it here). Unknown fields are refused: a document of a newer ``version`` must
not be half-understood. Errors name the field, the value and the rule — never a secret's value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from agent_runner.exitcodes import CONFIG_ERROR, RunnerError

TASK_DOCUMENT_VERSION = 1
RESTRICTED_OPERATIONS = ("send_email", "purchase", "delete_data", "change_permissions")
TOOLS = ("web_fetch", *RESTRICTED_OPERATIONS)

ToolName = Literal["web_fetch", "send_email", "purchase", "delete_data", "change_permissions"]
RestrictedOperation = Literal["send_email", "purchase", "delete_data", "change_permissions"]
ProviderName = Literal["openai", "anthropic", "offline"]

_DECIMAL = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,12})?$")
_VALUE_PREVIEW = 80


class ConfigError(RunnerError):
    """The run cannot start (or go on) with this configuration; retrying will not help."""

    exit_code = CONFIG_ERROR


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
        if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
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


_ENV_PREFIX = "NOCTURNE_"


class RunnerEnv(_Model):
    """The pod's ``NOCTURNE_*`` environment (downward API, Secrets, cluster config)."""

    task_file: Path = Field(alias="NOCTURNE_TASK_FILE")
    pod_name: str = Field(alias="NOCTURNE_POD_NAME", min_length=1)
    pod_uid: str = Field(alias="NOCTURNE_POD_UID", min_length=1)
    job_name: str = Field(alias="NOCTURNE_JOB_NAME", min_length=1)
    job_uid: str = Field(alias="NOCTURNE_JOB_UID", min_length=1)
    database_url: SecretStr = Field(alias="NOCTURNE_DATABASE_URL")
    llm_api_key: SecretStr | None = Field(None, alias="NOCTURNE_LLM_API_KEY")
    price_table: Path | None = Field(None, alias="NOCTURNE_PRICE_TABLE")
    termination_log: Path = Field(Path("/dev/termination-log"), alias="NOCTURNE_TERMINATION_LOG")
    # Set by the operator on run-now Jobs: the request id that started this run.
    manual_request: str | None = Field(None, alias="NOCTURNE_MANUAL_REQUEST", max_length=253)
    # Cluster config: lets web_fetch reach private and loopback (never link-local) addresses.
    web_fetch_allow_private: bool = Field(False, alias="NOCTURNE_WEB_FETCH_ALLOW_PRIVATE")

    @field_validator("database_url")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value


_SECRET_ENV = frozenset({"NOCTURNE_DATABASE_URL", "NOCTURNE_LLM_API_KEY"})
ENV_VARS = tuple(
    field.alias for field in RunnerEnv.model_fields.values() if field.alias is not None
)


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
        lines.append(f"{field} {_preview(err['input'])}: {err['msg']}")
    return "; ".join(lines)


def _preview(value: object) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) > _VALUE_PREVIEW:
        text = text[: _VALUE_PREVIEW - 3] + "..."
    return text


def parse_task(data: Mapping[str, Any] | str | bytes) -> TaskDocument:
    """The task document from JSON text or a decoded mapping; ConfigError if it is not valid."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"task document: not valid JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"task document: must be a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if version != TASK_DOCUMENT_VERSION:
        raise ConfigError(
            f"task document version {_preview(version)}: this runner understands version "
            f"{TASK_DOCUMENT_VERSION} only (operator and runner images out of step?)"
        )
    try:
        return TaskDocument.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"task document: {describe_validation_error(exc, prefix='task document field ')}"
        ) from exc


def load_task(path: Path) -> TaskDocument:
    """Read and parse the task file; ConfigError naming the path when it is missing or invalid."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"NOCTURNE_TASK_FILE {str(path)!r}: cannot read: {exc.strerror}") from exc
    try:
        return parse_task(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_env(environ: Mapping[str, str] | None = None) -> RunnerEnv:
    """The runner's settings from ``environ`` (default ``os.environ``). Empty optional variables
    count as unset. Other ``NOCTURNE_*`` variables are ignored."""
    if environ is None:
        import os  # noqa: PLC0415 - only the default needs the process environment

        environ = os.environ
    values = {name: environ[name] for name in ENV_VARS if environ.get(name, "") != ""}
    try:
        return RunnerEnv.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(
            f"environment: {describe_validation_error(exc, secret_fields=_SECRET_ENV)}"
        ) from exc
