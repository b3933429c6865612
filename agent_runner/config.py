"""The runner's inputs: the task snapshot its Job carries (``$NOCTURNE_TASK``, rendered by the
operator into the Job template, so every attempt of a Job runs the task the Job was created
with) and the pod's environment (downward API, the run API's address and CA, the LLM key).

The task model lives in ``agent_runner.contract`` (the operator renders it and its run API reads
the caps from the Job). Unknown fields are refused: a document of a newer ``version`` must not be
half-understood. Errors name the field, the value and the rule — never a secret's value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from agent_runner.contract import (
    ENV_TASK,
    RESTRICTED_OPERATIONS,
    TASK_DOCUMENT_VERSION,
    TOKEN_DIR,
    TOOLS,
    AgentSpec,
    BudgetSpec,
    ScheduleIdentity,
    TaskDocument,
    TaskSpec,
    describe_validation_error,
    parse_task_document,
)
from agent_runner.contract import TOKEN_FILE as TOKEN_FILE_NAME
from agent_runner.exitcodes import CONFIG_ERROR, RunnerError

__all__ = [
    "ENV_VARS",
    "RESTRICTED_OPERATIONS",
    "TASK_DOCUMENT_VERSION",
    "TOKEN_FILE",
    "TOOLS",
    "AgentSpec",
    "BudgetSpec",
    "ConfigError",
    "RunnerEnv",
    "ScheduleIdentity",
    "TaskDocument",
    "TaskSpec",
    "load_env",
    "parse_task",
]

TOKEN_FILE = Path(TOKEN_DIR) / TOKEN_FILE_NAME
"""Where the pod's projected run-API token is mounted (audience ``TOKEN_AUDIENCE``)."""


class ConfigError(RunnerError):
    """The run cannot start (or go on) with this configuration; retrying will not help."""

    exit_code = CONFIG_ERROR


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RunnerEnv(_Model):
    """The pod's ``NOCTURNE_*`` environment. No database URL, no Kubernetes token: the run API
    is the runner's only way to report."""

    task: str = Field(alias=ENV_TASK, min_length=2)
    pod_name: str = Field(alias="NOCTURNE_POD_NAME", min_length=1)
    pod_uid: str = Field(alias="NOCTURNE_POD_UID", min_length=1)
    job_name: str = Field(alias="NOCTURNE_JOB_NAME", min_length=1)
    job_uid: str = Field(alias="NOCTURNE_JOB_UID", min_length=1)
    run_api_url: str = Field(alias="NOCTURNE_RUN_API_URL")
    run_api_ca: str = Field(alias="NOCTURNE_RUN_API_CA")
    token_file: Path = Field(TOKEN_FILE, alias="NOCTURNE_RUN_API_TOKEN_FILE")
    llm_api_key: SecretStr | None = Field(None, alias="NOCTURNE_LLM_API_KEY")
    termination_log: Path = Field(Path("/dev/termination-log"), alias="NOCTURNE_TERMINATION_LOG")
    # Cluster config: lets web_fetch reach private and loopback (never link-local) addresses.
    web_fetch_allow_private: bool = Field(False, alias="NOCTURNE_WEB_FETCH_ALLOW_PRIVATE")

    @field_validator("run_api_url")
    @classmethod
    def _https(cls, value: str) -> str:
        # The grant and every report travel over TLS the runner verifies: never plain http.
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise ValueError("must be an https:// URL (the run API is served over TLS)")
        if any(ch.isspace() for ch in value):
            raise ValueError("must not contain spaces")
        return value.rstrip("/")

    @field_validator("run_api_ca")
    @classmethod
    def _pem(cls, value: str) -> str:
        if "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("must be a PEM certificate bundle (the operator's run API CA)")
        return value


_SECRET_ENV = frozenset({"NOCTURNE_LLM_API_KEY"})
ENV_VARS = tuple(
    field.alias for field in RunnerEnv.model_fields.values() if field.alias is not None
)


def parse_task(data: Mapping[str, Any] | str | bytes) -> TaskDocument:
    """The task document from JSON text or a decoded mapping; ConfigError if it is not valid."""
    try:
        if isinstance(data, Mapping):
            return parse_task_document(json.dumps(dict(data), default=str))
        return parse_task_document(data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


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
