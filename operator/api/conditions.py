"""Status conditions: the truth about an AgentSchedule; ``phase`` is derived from them.

Reasons are CamelCase constants defined here only. ``lastTransitionTime`` changes only when a
condition's status flips, so re-running a reconcile leaves conditions byte-identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from nocturne_operator.api.timestamps import rfc3339

# Condition types
READY = "Ready"
SUSPENDED = "Suspended"
SCHEDULE_WARNING = "ScheduleWarning"
BUDGET_EXHAUSTED = "BudgetExhausted"
SILENT_STOP = "SilentStop"

# Reasons
RECONCILED = "Reconciled"
INVALID_SPEC = "InvalidSpec"
QUOTA_EXCEEDED = "QuotaExceeded"
SUSPENDED_BY_USER = "SuspendedByUser"
CONSECUTIVE_FAILURES = "ConsecutiveFailures"
TOTAL_BUDGET_REACHED = "TotalBudgetReached"
MONTHLY_BUDGET_REACHED = "MonthlyBudgetReached"
NAMESPACE_BUDGET_REACHED = "NamespaceBudgetReached"
NO_SUCCESSFUL_RUN = "NoSuccessfulRun"
RUNS_SUCCEEDING = "RunsSucceeding"
NOT_SCHEDULED = "NotScheduled"
WITHIN_BUDGET = "WithinBudget"
NOT_SUSPENDED = "NotSuspended"
DST_TRANSITIONS = "DSTTransitions"
NO_DST_ISSUES = "NoDSTIssues"

# Phases (a convenience for humans, derived from the conditions)
PHASE_PENDING = "Pending"
PHASE_ACTIVE = "Active"
PHASE_SUSPENDED = "Suspended"
PHASE_INVALID = "Invalid"
PHASE_BUDGET_EXHAUSTED = "BudgetExhausted"

_ORDER = (READY, SUSPENDED, BUDGET_EXHAUSTED, SILENT_STOP, SCHEDULE_WARNING)


def condition(
    type_: str, status: bool, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """A condition without its transition time (``merge`` fills that in)."""
    cond: dict[str, Any] = {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge(
    current: Iterable[Mapping[str, Any]] | None,
    desired: Iterable[Mapping[str, Any]],
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions after applying ``desired`` to ``current``: lastTransitionTime is kept unless
    the status flips; conditions not mentioned in ``desired`` are kept as they are."""
    by_type = {c["type"]: dict(c) for c in current or [] if "type" in c}
    stamp = rfc3339(now)
    for new in desired:
        old = by_type.get(new["type"])
        merged = dict(new)
        if old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            merged["lastTransitionTime"] = stamp
        by_type[new["type"]] = merged
    return sorted(
        by_type.values(),
        key=lambda c: (_ORDER.index(c["type"]) if c["type"] in _ORDER else len(_ORDER), c["type"]),
    )


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    """True when the condition of ``type_`` exists with status True."""
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions or [])


def phase(conditions: Iterable[Mapping[str, Any]] | None) -> str:
    """The human-facing phase derived from the conditions."""
    conds = list(conditions or [])
    ready = next((c for c in conds if c.get("type") == READY), None)
    if ready is None:
        return PHASE_PENDING
    if ready.get("status") == "False" and ready.get("reason") in (INVALID_SPEC, QUOTA_EXCEEDED):
        return PHASE_INVALID
    if is_true(conds, BUDGET_EXHAUSTED):
        return PHASE_BUDGET_EXHAUSTED
    if is_true(conds, SUSPENDED):
        return PHASE_SUSPENDED
    return PHASE_ACTIVE
