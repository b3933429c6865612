"""Namespace budgets (``namespace_budgets``): the money limits AgentSchedulePolicies set for whole
namespaces -- a monthly USD cap on all their schedules together, and a per-run cap replacing the
cluster's. The operator keeps the rows in step with its policies (``sync_namespace_
budgets``); ``reserve()`` applies a namespace's row to every grant there, and a schedule's pass
reads what its namespace spent this month (``namespace_month_cost``) to hold it when the cap is
reached. Kept in the database, not in one process's memory, so that every replica's run API
applies it from its first grant on, and a restart forgets nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import MAX_USD
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.queries import cost_sum, month_start
from nocturne_operator.storage.schema import EXECUTIONS, NAMESPACE_BUDGETS
from nocturne_operator.storage.values import aware

__all__ = ["NamespaceBudgetRow", "NamespaceBudgets", "row_of"]


@dataclass(frozen=True)
class NamespaceBudgetRow:
    """A namespace's money limits: the monthly cap (None: none), the zone its month resets in
    and the policy that set it; the per-run cap that replaces the cluster's there (None: the
    cluster's) and its policy."""

    max_monthly_usd: Decimal | None
    time_zone: str = "UTC"
    policy: str | None = None
    max_per_run_usd: Decimal | None = None
    per_run_policy: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_monthly_usd", "max_per_run_usd"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Decimal):
                raise TypeError(f"{name}: {value!r} must be a Decimal")
            if not value.is_finite() or value < 0 or value > MAX_USD:
                raise ValueError(f"{name}: {value} must be from 0 to {MAX_USD}")
        if self.max_monthly_usd is None and self.max_per_run_usd is None:
            raise ValueError("a namespace budget row needs a monthly or a per-run cap")
        if self.max_per_run_usd is not None and not self.max_per_run_usd:
            raise ValueError("max_per_run_usd: must be greater than 0")
        month_start(datetime.now(UTC), self.time_zone)  # raises unless an IANA zone


_COLUMNS = ("max_monthly_usd", "time_zone", "policy", "max_per_run_usd", "per_run_policy")


def _stored(conn: sa.Connection, *, lock: bool = False) -> dict[str, NamespaceBudgetRow]:
    """Every namespace's budget as stored (``lock``: rows locked until the transaction ends)."""
    b = NAMESPACE_BUDGETS
    query = sa.select(b.c.namespace, *(b.c[c] for c in _COLUMNS))
    rows = conn.execute(query.with_for_update() if lock else query)
    return {r.namespace: row_of(r) for r in rows}


def row_of(row: sa.Row[Any]) -> NamespaceBudgetRow:
    """The budget a ``namespace_budgets`` row holds."""
    return NamespaceBudgetRow(
        None if row.max_monthly_usd is None else Decimal(row.max_monthly_usd),
        row.time_zone,
        row.policy,
        None if row.max_per_run_usd is None else Decimal(row.max_per_run_usd),
        row.per_run_policy,
    )


class NamespaceBudgets(Repository):
    """Writes and reads of ``namespace_budgets``."""

    def namespace_budgets(self) -> dict[str, NamespaceBudgetRow]:
        """Every namespace's budget as stored."""
        with self._begin("read the namespace budgets") as conn:
            return _stored(conn)

    def sync_namespace_budgets(
        self,
        budgets: Mapping[str, NamespaceBudgetRow],
        manages: Callable[[str], bool] = lambda _namespace: True,
    ) -> int:
        """Make the table hold exactly ``budgets`` (namespace -> its budget) for the namespaces
        ``manages`` accepts (an operator serving some namespaces leaves other operators' rows
        alone); returns how many rows changed. Rows already equal are not written (idempotent:
        a second call writes nothing)."""
        b = NAMESPACE_BUDGETS
        with self._begin("keep the namespace budgets in step with the policies") as conn:
            stored = _stored(conn, lock=True)
            gone = sorted(ns for ns in set(stored) - set(budgets) if manages(ns))
            changed = {ns: row for ns, row in budgets.items() if stored.get(ns) != row}
            if gone:
                conn.execute(sa.delete(b).where(b.c.namespace.in_(gone)))
            if changed:
                insert = pg.insert(b).values(
                    [
                        {"namespace": ns, **{c: getattr(row, c) for c in _COLUMNS}}
                        for ns, row in sorted(changed.items())
                    ]
                )
                conn.execute(
                    insert.on_conflict_do_update(
                        constraint="pk_namespace_budgets",
                        set_={
                            **{c: insert.excluded[c] for c in _COLUMNS},
                            "updated_at": sa.func.now(),
                        },
                    )
                )
        return len(gone) + len(changed)

    def namespace_month_cost(self, namespace: str, since: datetime) -> Decimal:
        """What every run of ``namespace`` started since ``since`` cost (reserved grants not
        counted: this is what was spent)."""
        aware("since", since)
        t = EXECUTIONS
        with self._begin(
            f"sum the cost of namespace {namespace} since {since.isoformat()}"
        ) as conn:
            total = conn.execute(
                sa.select(cost_sum()).where(t.c.namespace == namespace, t.c.started_at >= since)
            ).scalar_one()
        return Decimal(total)
