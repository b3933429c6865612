"""Central budget grants and schedule-UID keys on schedule_executions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08

- ``granted_usd``: what the operator granted the attempt when it reserved its budget (NULL for
  rows written before grants, or without one: they count at their cost).
- ``ix_schedule_executions_uid_started``: "runs of schedule UID X, newest first", carrying what
  the budget sums read, so a reservation sums a schedule's committed spend index-only.
- ``ix_schedule_executions_uid_running``: the few RUNNING rows of a schedule UID, oldest first.

The (namespace, schedule_name) indexes stay: ``nocturne history NAME`` lists every incarnation.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("schedule_executions", sa.Column("granted_usd", sa.Numeric(14, 6), nullable=True))
    op.create_check_constraint(
        "ck_schedule_executions_granted_usd", "schedule_executions", "granted_usd >= 0"
    )
    op.create_index(
        "ix_schedule_executions_uid_started",
        "schedule_executions",
        ["schedule_uid", sa.text("started_at DESC"), sa.text("id DESC")],
        postgresql_include=["cost_usd", "status", "granted_usd"],
    )
    op.create_index(
        "ix_schedule_executions_uid_running",
        "schedule_executions",
        ["schedule_uid", "started_at", "id"],
        postgresql_where=sa.text("status = 'RUNNING'"),
    )


def downgrade() -> None:
    op.drop_index("ix_schedule_executions_uid_running", table_name="schedule_executions")
    op.drop_index("ix_schedule_executions_uid_started", table_name="schedule_executions")
    op.drop_constraint("ck_schedule_executions_granted_usd", "schedule_executions", type_="check")
    op.drop_column("schedule_executions", "granted_usd")
