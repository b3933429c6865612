"""Namespace budgets: the money limits AgentSchedulePolicies set for whole namespaces.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

- ``namespace_budgets``: per namespace, the monthly cap on every run of its schedules together
  (with the zone whose month it resets in, and the policy that set it) and the per-run cap that
  replaces the cluster's there (and its policy); a row has at least one of them. The operator
  keeps the rows in step with its policies; ``reserve()`` applies a namespace's row to every
  grant there -- the monthly cap under the namespace's advisory lock, summing the namespace's
  runs of the month through ``ix_schedule_executions_namespace_started`` (migration 0009), so
  concurrent Jobs of different schedules cannot overspend it.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "namespace_budgets",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("max_monthly_usd", sa.Numeric(14, 6), nullable=True),
        sa.Column("time_zone", sa.Text(), nullable=False),
        sa.Column("policy", sa.Text(), nullable=True),
        sa.Column("max_per_run_usd", sa.Numeric(14, 6), nullable=True),
        sa.Column("per_run_policy", sa.Text(), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("namespace", name="pk_namespace_budgets"),
        sa.CheckConstraint("max_monthly_usd >= 0", name="ck_namespace_budgets_max_monthly_usd"),
        sa.CheckConstraint("max_per_run_usd > 0", name="ck_namespace_budgets_max_per_run_usd"),
        sa.CheckConstraint(
            "max_monthly_usd IS NOT NULL OR max_per_run_usd IS NOT NULL",
            name="ck_namespace_budgets_a_limit",
        ),
    )


def downgrade() -> None:
    op.drop_table("namespace_budgets")
