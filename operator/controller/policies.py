"""AgentSchedulePolicies at work: the namespace budgets kept in the database for ``reserve()``,
each policy's status (how many namespaces it selects, whether it is valid), and the schedules to
look at again when a policy or a namespace's labels change."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from nocturne_operator.api import conditions as cond
from nocturne_operator.api.policy import POLICY_KIND
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.schedule.policy import Policy
from nocturne_operator.schedule.validation import Limits
from nocturne_operator.storage import HistoryError, NamespaceBudgetRow

__all__ = [
    "budget_row",
    "policy_status",
    "queue_all",
    "queue_namespace",
    "refresh_statuses",
    "sync_budgets",
]

log = logging.getLogger(__name__)

VALID = "Valid"


def sync_budgets(memo: Memo, indexes: Indexes) -> bool:
    """Write the monthly budgets of the namespaces this process serves (as their policies set
    them) to ``namespace_budgets``, where every replica's grants read them. False when the
    database is away (the sweep tries again)."""
    history = memo.history
    if history is None:
        return True
    budgets: dict[str, NamespaceBudgetRow] = {}
    for namespace in list(indexes.namespaces):
        if memo.serves(namespace):
            row = budget_row(indexes.limits(memo.settings, namespace))
            if row is not None:
                budgets[namespace] = row
    try:
        changed = history.sync_namespace_budgets(budgets, memo.serves)
    except HistoryError as exc:
        log.warning("namespace budgets not written: %s", exc)
        return False
    if changed:
        log.info(
            "namespace budgets: %d row(s) written, %d namespace(s) capped", changed, len(budgets)
        )
    return True


def budget_row(limits: Limits) -> NamespaceBudgetRow | None:
    """The money limits the grants of a namespace with ``limits`` must apply (None: the
    cluster's). A broken policy selecting the namespace allows nothing until it is fixed (its
    schedules are held; a Job started by hand or a retry gets no grant either): whatever
    limit it meant to set is never silently dropped."""
    if limits.broken_policies:
        return NamespaceBudgetRow(Decimal(0), "UTC", limits.broken_policies[0])
    cap = limits.namespace_budget
    per_run = limits.max_per_run_usd if limits.max_per_run_policy else None
    if cap is None and per_run is None:
        return None
    return NamespaceBudgetRow(
        None if cap is None else cap.max_monthly_usd,
        "UTC" if cap is None else cap.time_zone,
        None if cap is None else cap.policy,
        per_run,
        limits.max_per_run_policy or None,
    )


def selected(indexes: Indexes, policy: Policy) -> list[str]:
    """The namespaces ``policy`` selects, as last watched, by name."""
    return sorted(
        name
        for name, store in list(indexes.namespaces.items())
        for labels in store
        if policy.selects(labels)
    )


def queue_namespace(memo: Memo, indexes: Indexes, namespace: str) -> None:
    """Queue the schedules of ``namespace`` (its labels changed: other policies may apply)."""
    for key in list(indexes.bodies):
        if key[0] == namespace:
            memo.queue.add(key)


def policy_status(
    memo: Memo, indexes: Indexes, body: dict[str, Any], now: datetime | None = None
) -> dict[str, Any]:
    """Bring a policy's status in line: the namespaces it selects, and Valid (with the errors
    that hold its namespaces' schedules). Returns the patch written ({}: nothing changed)."""
    meta = body["metadata"]
    policy = Policy.parse(str(meta["name"]), body.get("spec"))
    generation = meta.get("generation")
    if policy.spec is not None:
        valid = cond.condition(VALID, True, "Valid", "", generation)
    else:
        message = "; ".join(policy.errors)
        if policy.selector is None:
            message += " (its namespaceSelector is broken too: it selects no namespace)"
        valid = cond.condition(VALID, False, "Invalid", message, generation)
    old = dict(body.get("status") or {})
    conditions = cond.merge(old.get("conditions"), [valid], now or datetime.now(UTC))
    new = {
        "observedGeneration": generation,
        "namespaces": len(selected(indexes, policy)),
        "conditions": conditions,
    }
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    if patch:
        memo.kube.merge_patch(POLICY_KIND, "", str(meta["name"]), {"status": patch}, status=True)
        cached = memo.policy_bodies.get(str(meta["name"]))
        if cached is not None:
            cached["status"] = {**old, **patch}
    return patch


def refresh_statuses(memo: Memo, indexes: Indexes) -> None:
    """Every policy's status as its last event left it, brought in line (a namespace came,
    went or was relabelled: how many each selects changed); a failure is logged, the next
    event tries again."""
    for name, body in sorted(memo.policy_bodies.items()):
        try:
            policy_status(memo, indexes, body)
        except Exception as exc:  # any API error: never lose the rest of the handler
            log.warning("status of AgentSchedulePolicy %s not written: %s", name, exc)


def queue_all(memo: Memo, indexes: Indexes) -> None:
    """Queue every schedule: a policy changed (what it selected before is not known, and its
    new selection may differ; policies change rarely)."""
    for key in list(indexes.bodies):
        memo.queue.add(key)
