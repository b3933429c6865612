"""Which limits a namespace's schedules get: the cluster's settings, as the AgentSchedulePolicies
selecting the namespace tighten or relax them.

For each limit, the policies selecting the namespace that set it are looked at; the one of
highest ``priority`` decides, and at equal priority the stricter value wins (the longer minimum
interval, the smaller cap, every list having its say). A limit no policy sets stays the
cluster's. A policy that selects the namespace but cannot be read (a zone or an endpoint the
CRD's schema could not check) holds the namespace's schedules until it is fixed: an admin's
limit is never silently dropped. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import ValidationError

from nocturne_operator.api.policy import POLICY_KIND, AgentSchedulePolicySpec
from nocturne_operator.schedule.validation import (
    Allowed,
    Limits,
    NamespaceCap,
    iana_zone,
)
from nocturne_operator.settings import Endpoint, Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """One AgentSchedulePolicy as read: its spec, or why it cannot be used."""

    name: str
    spec: AgentSchedulePolicySpec | None
    errors: tuple[str, ...] = ()
    # The raw selector of a policy whose spec failed: it still decides where the policy holds
    # schedules (None: the selector itself is broken, so it selects nothing).
    selector: AgentSchedulePolicySpec | None = None

    @property
    def by(self) -> str:
        """What messages append to a rule this policy decided."""
        return f' ({POLICY_KIND} "{self.name}")'

    @classmethod
    def parse(cls, name: str, spec: object) -> Policy:
        """Read a policy's ``spec``; never raises (a broken one carries its errors)."""
        if not isinstance(spec, Mapping):
            return cls(name, None, ("spec: required, must be a mapping",))
        try:
            parsed = AgentSchedulePolicySpec.model_validate(dict(spec))
        except ValidationError as exc:
            errors = tuple(_pydantic_errors(exc))
            return cls(name, None, errors, _selector_only(spec))
        problems = tuple(_semantic_errors(parsed))
        if problems:
            return cls(name, None, problems, parsed)
        return cls(name, parsed)

    def selects(self, labels: Mapping[str, str]) -> bool:
        """True when this policy applies to a namespace with ``labels``."""
        spec = self.spec or self.selector
        return spec is not None and spec.namespace_selector.matches(dict(labels))


def _selector_only(spec: Mapping[str, Any]) -> AgentSchedulePolicySpec | None:
    """The policy reduced to its selector, when that much of it is valid."""
    try:
        return AgentSchedulePolicySpec.model_validate(
            {"namespaceSelector": spec.get("namespaceSelector")}
        )
    except ValidationError:
        return None


def _pydantic_errors(exc: ValidationError) -> Iterable[str]:
    for err in exc.errors():
        path = "spec" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
        )
        message = str(err["msg"]).removeprefix("Value error, ")
        yield f"{path}: {message}"


def _semantic_errors(spec: AgentSchedulePolicySpec) -> Iterable[str]:
    """What the CRD's schema cannot check: the zone of the namespace's month, and endpoints."""
    budget = spec.namespace_budget
    if budget is not None and iana_zone(budget.time_zone) is None:
        yield (
            f'spec.namespaceBudget.timeZone "{budget.time_zone}": not an IANA time zone name '
            "(e.g. Europe/Berlin)"
        )
    for i, url in enumerate(spec.allow.llm_base_urls or ()):
        try:
            Endpoint.parse(url)
        except ValueError as exc:
            yield f'spec.allow.llmBaseURLs[{i}] "{url}": {exc}'


def limits_for(
    settings: Settings, policies: Iterable[Policy], labels: Mapping[str, str] | None
) -> Limits:
    """The limits of a namespace with ``labels`` (None: the namespace is not known yet, so only
    policies selecting every namespace apply)."""
    chosen = [p for p in policies if p.selects(labels or {})]
    cluster = Limits.of(settings)
    broken_policies = sorted((p for p in chosen if p.spec is None), key=lambda p: p.name)
    broken = tuple(
        f'{POLICY_KIND} "{p.name}" selects this namespace but is invalid '
        f"({'; '.join(p.errors)}); its schedules are held until it is fixed"
        for p in broken_policies
    )
    usable = [p for p in chosen if p.spec is not None]
    if not usable and not broken:
        return cluster
    interval, interval_by = _decide(
        usable, lambda s: s.limits.min_interval_minutes, max, cluster.min_interval_minutes
    )
    per_run, per_run_by = _decide(
        usable, lambda s: s.limits.max_per_run_usd, min, cluster.max_per_run_usd
    )
    schedules, schedules_by = _decide(
        usable, lambda s: s.limits.max_schedules, min, cluster.max_schedules
    )
    allow = {
        name: _lists(usable, name, getattr(cluster, name))
        for name in ("providers", "models", "llm_base_urls", "llm_secrets", "webhook_secrets")
    }
    return replace(
        cluster,
        min_interval_minutes=interval,
        min_interval_by=interval_by.by if interval_by else "",
        max_per_run_usd=per_run,
        max_per_run_by=per_run_by.by if per_run_by else "",
        max_per_run_policy=per_run_by.name if per_run_by else "",
        max_schedules=schedules,
        max_schedules_by=schedules_by.by if schedules_by else "",
        namespace_budget=_budget(usable),
        broken=broken,
        broken_policies=tuple(p.name for p in broken_policies),
        **allow,
    )


def _top(
    policies: Sequence[Policy], pick: Callable[[AgentSchedulePolicySpec], T | None]
) -> list[tuple[Policy, T]]:
    """The policies of highest priority among those setting the limit ``pick`` reads."""
    setting = [(p, v) for p in policies if p.spec is not None and (v := pick(p.spec)) is not None]
    if not setting:
        return []
    best = max(p.spec.priority for p, _ in setting if p.spec is not None)
    return sorted(
        [(p, v) for p, v in setting if p.spec is not None and p.spec.priority == best],
        key=lambda item: item[0].name,
    )


def _decide(
    policies: Sequence[Policy],
    pick: Callable[[AgentSchedulePolicySpec], T | None],
    stricter: Callable[[T, T], T],
    default: T,
) -> tuple[T, Policy | None]:
    """A limit's value and the policy that decided it (None: the cluster's settings)."""
    top = _top(policies, pick)
    if not top:
        return default, None
    value = top[0][1]
    for _, other in top[1:]:
        value = stricter(value, other)
    return value, next(p for p, v in top if v == value)


def _lists(
    policies: Sequence[Policy], name: str, default: tuple[Allowed, ...]
) -> tuple[Allowed, ...]:
    """The allow list ``spec.allow.<name>``: those of the top policies (each must allow a
    value), else the cluster's."""

    def pick(spec: AgentSchedulePolicySpec) -> Sequence[str] | None:
        value: Sequence[str] | None = getattr(spec.allow, name)
        return value

    top = _top(policies, pick)
    if not top:
        return default
    return tuple(Allowed(tuple(str(v) for v in values), p.by) for p, values in top)


def _budget(policies: Sequence[Policy]) -> NamespaceCap | None:
    top = _top(policies, lambda s: s.namespace_budget)
    if not top:
        return None
    policy, budget = min(top, key=lambda item: item[1].max_monthly_usd)
    return NamespaceCap(Decimal(budget.max_monthly_usd), budget.time_zone, policy.name)
