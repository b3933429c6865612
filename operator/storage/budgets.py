"""Namespace budgets (``namespace_budgets``): the monthly USD caps AgentSchedulePolicies put on
whole namespaces. The operator keeps the rows in step with its policies (``sync_namespace_
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

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.queries import cost_sum, month_start
from nocturne_operator.storage.schema import EXECUTIONS, NAMESPACE_BUDGETS
from nocturne_operator.storage.values import aware

__all__ = ["NamespaceBudgetRow", "NamespaceBudgets"]


@dataclass(frozen=True)
class NamespaceBudgetRow:
    """A namespace's monthly cap, the zone its month resets in, and the policy that set it."""

    max_monthly_usd: Decimal
    time_zone: str
    policy: str

    def __post_init__(self) -> None:
        if not isinstance(self.max_monthly_usd, Decimal):
            raise TypeError(f"max_monthly_usd: {self.max_monthly_usd!r} must be a Decimal")
        if not self.max_monthly_usd.is_finite() or self.max_monthly_usd < 0:
            raise ValueError(f"max_monthly_usd: {self.max_monthly_usd} must be >= 0")
        month_start(datetime.now(UTC), self.time_zone)  # raises unless an IANA zone


def _stored(conn: sa.Connection, *, lock: bool = False) -> dict[str, NamespaceBudgetRow]:
    """Every namespace's budget as stored (``lock``: rows locked until the transaction ends)."""
    b = NAMESPACE_BUDGETS
    query = sa.select(b.c.namespace, b.c.max_monthly_usd, b.c.time_zone, b.c.policy)
    rows = conn.execute(query.with_for_update() if lock else query)
    return {
        r.namespace: NamespaceBudgetRow(Decimal(r.max_monthly_usd), r.time_zone, r.policy)
        for r in rows
    }


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
                        {
                            "namespace": ns,
                            "max_monthly_usd": row.max_monthly_usd,
                            "time_zone": row.time_zone,
                            "policy": row.policy,
                        }
                        for ns, row in sorted(changed.items())
                    ]
                )
                conn.execute(
                    insert.on_conflict_do_update(
                        constraint="pk_namespace_budgets",
                        set_={
                            "max_monthly_usd": insert.excluded.max_monthly_usd,
                            "time_zone": insert.excluded.time_zone,
                            "policy": insert.excluded.policy,
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
