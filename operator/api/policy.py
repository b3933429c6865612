"""The AgentSchedulePolicy API (nocturne.dev/v1alpha1, cluster-scoped) as pydantic models.

A cluster admin's per-namespace limits: it selects namespaces by label and tightens or relaxes
the cluster's defaults (the Helm values) there -- minimum interval, per-run cap, schedules per
namespace, a monthly USD cap for the whole namespace, and the providers, models, endpoints and
Secrets schedules may use. ``schedule.policy`` decides which policy sets each limit.

These mirror ``crds/agentschedulepolicies.nocturne.dev.yaml`` (a unit test keeps the two in
step). Money is ``Decimal`` parsed from decimal strings; never float.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent_runner.contract import USD_PER_RUN_PATTERN
from nocturne_operator.api.model import _SECRET_NAME_PATTERN, _Model, _no_repeats

POLICY_PLURAL = "agentschedulepolicies"
POLICY_KIND = "AgentSchedulePolicy"
# A namespace's monthly cap is kept in NUMERIC(14, 6) (namespace_budgets): below 10^8 USD.
NAMESPACE_BUDGET_PATTERN = r"^[0-9]{1,8}(\.[0-9]{1,6})?$"

# Label keys and values as the apiserver checks them (a qualified name with an optional DNS
# prefix; a value of at most 63 characters).
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"  # noqa: E501
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"


class LabelSelectorRequirement(_Model):
    """One ``matchExpressions`` entry of a Kubernetes label selector."""

    key: str = Field(min_length=1, max_length=316, pattern=_LABEL_KEY)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("values")
    @classmethod
    def _label_values(cls, value: list[str]) -> list[str]:
        for item in value:
            if len(item) > 63 or not re.fullmatch(_LABEL_VALUE, item):
                raise ValueError(f"{item!r} is not a label value")
        return value

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Model):
    """Namespaces by label, as everywhere in Kubernetes; ``{}`` selects every namespace."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels", max_length=64)
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, alias="matchExpressions", max_length=64
    )

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if len(key) > 316 or not re.fullmatch(_LABEL_KEY, key):
                raise ValueError(f"{key!r} is not a label key")
            if len(item) > 63 or not re.fullmatch(_LABEL_VALUE, item):
                raise ValueError(f"{item!r} (of {key!r}) is not a label value")
        return value

    def matches(self, labels: dict[str, str]) -> bool:
        """True when ``labels`` satisfy every term (Kubernetes' LabelSelectorAsSelector)."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for term in self.match_expressions:
            present = term.key in labels
            if term.operator == "Exists" and not present:
                return False
            if term.operator == "DoesNotExist" and present:
                return False
            if term.operator == "In" and (not present or labels[term.key] not in term.values):
                return False
            if term.operator == "NotIn" and present and labels[term.key] in term.values:
                return False
        return True


def _usd(value: object, pattern: str, *, positive: bool) -> Decimal:
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - pydantic turns ValueError into a field error
            'must be a decimal string such as "2.00" (quote it in YAML; floats lose cents)'
        )
    if not re.fullmatch(pattern, value):
        raise ValueError('must be a non-negative decimal string such as "2.00"')
    if positive and not Decimal(value):
        raise ValueError("must be greater than 0 (a run with no budget always fails)")
    return Decimal(value)


class PolicyLimits(_Model):
    """Limits a policy sets for the namespaces it selects; unset ones are left to others."""

    min_interval_minutes: int | None = Field(None, alias="minIntervalMinutes", ge=1, le=525_600)
    max_per_run_usd: Decimal | None = Field(None, alias="maxPerRunUSD")
    max_schedules: int | None = Field(None, alias="maxSchedules", ge=0, le=10_000)

    @field_validator("max_per_run_usd", mode="before")
    @classmethod
    def _per_run(cls, value: object) -> object:
        return None if value is None else _usd(value, USD_PER_RUN_PATTERN, positive=True)


class NamespaceBudget(_Model):
    """A monthly USD cap on every run of every schedule in the namespace together."""

    max_monthly_usd: Decimal = Field(alias="maxMonthlyUSD")
    # The month that resets the cap starts at local midnight on the 1st in this zone.
    time_zone: str = Field("UTC", alias="timeZone", min_length=1, max_length=64)

    @field_validator("max_monthly_usd", mode="before")
    @classmethod
    def _monthly(cls, value: object) -> object:
        return _usd(value, NAMESPACE_BUDGET_PATTERN, positive=False)


_MODEL = r"^[A-Za-z0-9][A-Za-z0-9._:/@+*-]*$"


class PolicyAllow(_Model):
    """What schedules may use; each list set here replaces the cluster's list (or, for
    providers and models, the price table's every entry)."""

    providers: list[Literal["openai", "anthropic", "offline"]] | None = Field(None, max_length=8)
    # Exact names, or a glob with ``*`` (``gpt-4o*``).
    models: list[str] | None = Field(None, max_length=64)
    llm_base_urls: list[str] | None = Field(None, alias="llmBaseURLs", max_length=64)
    llm_secrets: list[str] | None = Field(None, alias="llmSecrets", max_length=64)
    webhook_secrets: list[str] | None = Field(None, alias="webhookSecrets", max_length=64)

    @field_validator("providers", "models", "llm_base_urls", "llm_secrets", "webhook_secrets")
    @classmethod
    def _a_set(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        for item in value:
            if info.field_name == "models" and not re.fullmatch(_MODEL, item):
                raise ValueError(f"{item!r} is not a model name or glob")
            if info.field_name in ("llm_secrets", "webhook_secrets") and (
                len(item) > 253 or not re.fullmatch(_SECRET_NAME_PATTERN, item)
            ):
                raise ValueError(f"{item!r} is not a Secret name")
        return _no_repeats(value, "an entry")


class AgentSchedulePolicySpec(_Model):
    """spec of an AgentSchedulePolicy."""

    namespace_selector: LabelSelector = Field(alias="namespaceSelector")
    # Where several policies select a namespace, each limit comes from the highest priority
    # that sets it; at equal priority the stricter value wins.
    priority: int = Field(0, ge=-1000, le=1000)
    limits: PolicyLimits = Field(default_factory=PolicyLimits)
    namespace_budget: NamespaceBudget | None = Field(None, alias="namespaceBudget")
    allow: PolicyAllow = Field(default_factory=PolicyAllow)
