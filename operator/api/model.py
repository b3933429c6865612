"""The AgentSchedule API (nocturne.dev/v1alpha1) as pydantic models.

These mirror ``crds/agentschedules.nocturne.dev.yaml`` field for field (a unit test keeps the two in
step) and apply the same defaults, so the offline CLI sees what the apiserver would store.
Money is ``Decimal``, parsed from the CR's decimal strings; never float.
"""

from __future__ import annotations

import re
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent_runner.contract import USD_CAP_PATTERN, USD_PER_RUN_PATTERN

GROUP = "nocturne.dev"
VERSION = "v1alpha1"
PLURAL = "agentschedules"
KIND = "AgentSchedule"
API_VERSION = f"{GROUP}/{VERSION}"

RESTRICTED_OPERATIONS = ("send_email", "purchase", "delete_data", "change_permissions")
TOOLS = ("web_fetch", *RESTRICTED_OPERATIONS)
NOTIFICATION_EVENTS = (
    "Succeeded",
    "Failed",
    "BudgetExceeded",
    "AutoPaused",
    "Recovered",
    "SilentStop",
    "Alert",
)
# The apiserver's rule for object names (NameIsDNSSubdomain): labels of [-a-z0-9] that start
# and end alphanumeric, joined by dots. Settings, the CRD model and validation all use it.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A Secret name as the CRD's schema writes it (the apiserver's message quotes this pattern).
_SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # noqa: S105 - a regex
_KEY_NAME = r"^[-._a-zA-Z0-9]+$"


class Provider(StrEnum):
    """LLM provider families the runner speaks."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OFFLINE = "offline"


def _no_repeats(value: list[str], what: str) -> list[str]:
    """Lists the apiserver keeps as sets (x-kubernetes-list-type: set) refuse duplicates."""
    if len(set(value)) != len(value):
        raise ValueError(f"must not list {what} twice")
    return value


class _Model(BaseModel):
    # Strict, like the apiserver's structural schema: "600" is no integer, true no count, "yes"
    # no boolean (kubectl apply would be refused, so the offline check refuses them too).
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, str_strip_whitespace=False, strict=True
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the schedule's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=_SECRET_NAME_PATTERN)
    key: str = Field(min_length=1, max_length=253, pattern=_KEY_NAME)


class Task(_Model):
    """What the agent does on each run."""

    query: str = Field(min_length=1, max_length=16384)
    context: dict[str, Any] = Field(default_factory=dict)
    state_key: str | None = Field(
        None, alias="stateKey", max_length=128, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
    )

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class Agent(_Model):
    """Which model the agent uses, how to reach it, and what it may do."""

    model: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    # Not strict: the CR holds the enum's string value, never a Python enum member.
    provider: Provider = Field(Provider.OPENAI, strict=False)
    base_url: str = Field("", alias="baseURL", max_length=2048)
    api_key_secret_ref: SecretKeyRef | None = Field(None, alias="apiKeySecretRef")
    tools: list[
        Literal["web_fetch", "send_email", "purchase", "delete_data", "change_permissions"]
    ] = Field(default_factory=list, max_length=16)
    allow_restricted_operations: list[
        Literal["send_email", "purchase", "delete_data", "change_permissions"]
    ] = Field(default_factory=list, alias="allowRestrictedOperations", max_length=4)
    max_steps: int = Field(10, alias="maxSteps", ge=1, le=100)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not (
            value.startswith(("http://", "https://")) and len(value.split("://", 1)[1]) > 0
        ):
            raise ValueError("must be an http(s) URL")
        if any(ch.isspace() for ch in value):
            raise ValueError("must be an http(s) URL without spaces")
        return value

    @field_validator("tools")
    @classmethod
    def _implemented(cls, value: list[str]) -> list[str]:
        value = _no_repeats(value, "an entry")
        restricted = [t for t in value if t in RESTRICTED_OPERATIONS]
        if restricted:
            what = (
                f"{restricted[0]} is a restricted operation"
                if len(restricted) == 1
                else f"{', '.join(restricted)} are restricted operations"
            )
            raise ValueError(
                f"{what} no tool implements in this version of Nocturne; remove "
                f"{'it' if len(restricted) == 1 else 'them'} (an agent that calls one anyway is "
                "refused, and the refusal is recorded with its run)"
            )
        return value

    @field_validator("allow_restricted_operations")
    @classmethod
    def _nothing_to_allow(cls, value: list[str]) -> list[str]:
        value = _no_repeats(value, "an entry")
        if value:
            raise ValueError(
                f"no tool implements {', '.join(value)} in this version of Nocturne, so there "
                "is nothing to allow; remove it"
            )
        return value

    @model_validator(mode="after")
    def _key_unless_offline(self) -> Agent:
        if self.provider is not Provider.OFFLINE and self.api_key_secret_ref is None:
            raise ValueError(
                f"apiKeySecretRef is required for provider {self.provider.value!r} "
                "(only the offline provider needs no key)"
            )
        return self


class Budget(_Model):
    """USD caps. The per-run cap is hard; the total cap suspends the schedule when reached; the
    monthly cap suspends it until the next month starts in the schedule's time zone."""

    max_per_run_usd: Decimal = Field(alias="maxPerRunUSD")
    max_total_usd: Decimal | None = Field(None, alias="maxTotalUSD")
    max_monthly_usd: Decimal | None = Field(None, alias="maxMonthlyUSD")

    @field_validator("max_per_run_usd", "max_total_usd", "max_monthly_usd", mode="before")
    @classmethod
    def _decimal_string(cls, value: object, info: ValidationInfo) -> object:
        pattern = USD_PER_RUN_PATTERN if info.field_name == "max_per_run_usd" else USD_CAP_PATTERN
        if value is None and info.field_name != "max_per_run_usd":
            return value
        if not isinstance(value, str):
            # pydantic turns ValueError (not TypeError) into a field error.
            raise ValueError(  # noqa: TRY004
                'must be a decimal string such as "2.00" (quote it in YAML; floats lose cents)'
            )
        if not re.fullmatch(pattern, value):
            raise ValueError('must be a non-negative decimal string such as "2.00"')
        if info.field_name == "max_per_run_usd" and not Decimal(value):
            # The CRD's rule too: every run would fail for want of a budget grant.
            raise ValueError("must be greater than 0 (a run with no budget always fails)")
        return Decimal(value)

    @model_validator(mode="after")
    def _total_covers_one_run(self) -> Budget:
        if self.max_total_usd is not None and self.max_total_usd < self.max_per_run_usd:
            raise ValueError(
                f"maxTotalUSD {self.max_total_usd} is below maxPerRunUSD {self.max_per_run_usd}: "
                "a single run could spend past the total"
            )
        if self.max_monthly_usd is not None and self.max_monthly_usd < self.max_per_run_usd:
            raise ValueError(
                f"maxMonthlyUSD {self.max_monthly_usd} is below maxPerRunUSD "
                f"{self.max_per_run_usd}: a single run could spend past the month's cap"
            )
        return self


class FailurePolicy(_Model):
    """When repeated failures pause the schedule."""

    pause_after_consecutive_failures: int = Field(
        3, alias="pauseAfterConsecutiveFailures", ge=1, le=100
    )


class Notifications(_Model):
    """Where and when to notify."""

    webhook_secret_ref: SecretKeyRef | None = Field(None, alias="webhookSecretRef")
    events: list[
        Literal[
            "Succeeded",
            "Failed",
            "BudgetExceeded",
            "AutoPaused",
            "Recovered",
            "SilentStop",
            "Alert",
        ]
    ] = Field(default_factory=list, max_length=8)
    cooldown_minutes: int = Field(60, alias="cooldownMinutes", ge=0, le=10080)
    format: Literal["slack", "json"] = "json"

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return _no_repeats(value, "an event")

    @model_validator(mode="after")
    def _events_need_a_sink(self) -> Notifications:
        if self.events and self.webhook_secret_ref is None:
            raise ValueError(
                f"events lists {list(self.events)} but webhookSecretRef is missing: name the "
                "Secret holding the webhook URL"
            )
        return self


class AgentScheduleSpec(_Model):
    """``spec`` of an AgentSchedule."""

    schedule: str = Field(min_length=1, max_length=128)
    time_zone: str = Field(
        "UTC",
        alias="timeZone",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$",
    )
    suspend: bool = False
    task: Task
    agent: Agent
    budget: Budget
    timeout_seconds: int = Field(600, alias="timeoutSeconds", ge=30, le=86400)
    retries: int = Field(2, ge=0, le=10)
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        "Forbid", alias="concurrencyPolicy"
    )
    starting_deadline_seconds: int | None = Field(
        None, alias="startingDeadlineSeconds", ge=10, le=86400
    )
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, alias="failurePolicy")
    notifications: Notifications = Field(default_factory=Notifications)

    def to_cr(self) -> dict[str, Any]:
        """The spec as the apiserver stores it (camelCase, decimal strings)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
