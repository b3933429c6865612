"""Retention: purged runs' totals, and the indexes the purge reads.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

- ``schedule_purged_totals``: per schedule UID (with namespace and name for people) what its
  purged runs added up to -- cost, tokens, attempts, runs succeeded and failed, the span of
  their starts. The operator's retention purge adds a run here in the transaction that deletes
  it, so a lifetime sum (maxTotalUSD, status.totalCostUSD, the run counts) never drops.
- ``ix_schedule_executions_completed``: the purge takes the runs that ended longest ago first
  and reads nothing newer than its cutoff. Not on started_at: the planner would take that for
  "a schedule's runs, newest first" instead of the schedule's own index.
- ``ix_schedule_events_purgeable_at``: the same for audit rows, but a schedule's ``created``,
  which goes with its ``deleted``. Partial, so "a schedule's events, newest first" never uses it.
- ``ix_agent_state_execution_id``: deleting a run sets NULL the saved state naming it
  (``fk_agent_state_execution_id``), found by this index rather than a scan per deleted run.

Building the indexes blocks writes to those tables while it lasts (seconds for millions of rows).

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "schedule_purged_totals",
        sa.Column("schedule_uid", sa.Text(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(14, 6), server_default=sa.text("0"), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("first_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("schedule_uid", name="pk_schedule_purged_totals"),
        sa.CheckConstraint("cost_usd >= 0", name="ck_schedule_purged_totals_cost_usd"),
        sa.CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0", name="ck_schedule_purged_totals_tokens"
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND succeeded >= 0 AND failed >= 0",
            name="ck_schedule_purged_totals_counts",
        ),
    )
    op.create_index(
        "ix_schedule_purged_totals_schedule",
        "schedule_purged_totals",
        ["namespace", "schedule_name"],
    )
    op.create_index("ix_schedule_executions_completed", "schedule_executions", ["completed_at"])
    op.create_index(
        "ix_schedule_events_purgeable_at",
        "schedule_events",
        ["at"],
        postgresql_where=sa.text("kind <> 'created' OR schedule_uid IS NULL"),
    )
    op.create_index("ix_agent_state_execution_id", "agent_state", ["execution_id"])


def downgrade() -> None:
    op.drop_index("ix_agent_state_execution_id", table_name="agent_state")
    op.drop_index("ix_schedule_events_purgeable_at", table_name="schedule_events")
    op.drop_index("ix_schedule_executions_completed", table_name="schedule_executions")
    op.drop_index("ix_schedule_purged_totals_schedule", table_name="schedule_purged_totals")
    op.drop_table("schedule_purged_totals")
