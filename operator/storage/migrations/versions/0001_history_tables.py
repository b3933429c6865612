"""History tables: schedule_executions, schedule_events, agent_state.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_STATUSES = "'RUNNING', 'SUCCEEDED', 'FAILED', 'BUDGET_EXCEEDED', 'TIMED_OUT', 'CANCELLED'"


def upgrade() -> None:
    op.create_table(
        "schedule_executions",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("schedule_uid", sa.Text(), nullable=False),
        sa.Column("job_name", sa.Text(), nullable=False),
        sa.Column("job_uid", sa.Text(), nullable=False),
        sa.Column("pod_uid", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("manual_request", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cost_usd", sa.Numeric(14, 6), server_default=sa.text("0"), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("alert", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("alert_reason", sa.Text(), nullable=True),
        sa.Column("metadata", pg.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_executions"),
        sa.UniqueConstraint("job_uid", "pod_uid", name="uq_schedule_executions_job_uid_pod_uid"),
        sa.CheckConstraint(f"status IN ({_STATUSES})", name="ck_schedule_executions_status"),
        sa.CheckConstraint(
            "(status = 'RUNNING') = (completed_at IS NULL)",
            name="ck_schedule_executions_completed_at_iff_final",
        ),
        sa.CheckConstraint("cost_usd >= 0", name="ck_schedule_executions_cost_usd"),
        sa.CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0", name="ck_schedule_executions_tokens"
        ),
        sa.CheckConstraint("attempt >= 0", name="ck_schedule_executions_attempt"),
    )
    op.create_index(
        "ix_schedule_executions_schedule_started",
        "schedule_executions",
        ["namespace", "schedule_name", sa.text("started_at DESC"), sa.text("id DESC")],
        postgresql_include=["cost_usd", "status"],
    )
    op.create_index(
        "ix_schedule_executions_schedule_status_started",
        "schedule_executions",
        [
            "namespace",
            "schedule_name",
            "status",
            sa.text("started_at DESC"),
            sa.text("id DESC"),
        ],
    )
    op.create_index(
        "ix_schedule_executions_running",
        "schedule_executions",
        ["started_at"],
        postgresql_where=sa.text("status = 'RUNNING'"),
    )

    op.execute(
        "CREATE STATISTICS st_schedule_executions_schedule (ndistinct, dependencies) "
        "ON namespace, schedule_name FROM schedule_executions"
    )

    op.create_table(
        "schedule_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("schedule_uid", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("details", pg.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_events"),
        sa.CheckConstraint("kind ~ '^[a-z][a-z0-9_]*$'", name="ck_schedule_events_kind"),
    )
    op.create_index(
        "ix_schedule_events_schedule_at",
        "schedule_events",
        ["namespace", "schedule_name", "at"],
    )

    op.create_table(
        "agent_state",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("state_key", sa.Text(), nullable=False),
        sa.Column("state", pg.JSONB(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("execution_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("namespace", "schedule_name", "state_key", name="pk_agent_state"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["schedule_executions.id"],
            name="fk_agent_state_execution_id",
            ondelete="SET NULL",
        ),
    )


def downgrade() -> None:
    op.drop_table("agent_state")
    op.drop_index("ix_schedule_events_schedule_at", table_name="schedule_events")
    op.drop_table("schedule_events")
    op.execute("DROP STATISTICS st_schedule_executions_schedule")
    op.drop_index("ix_schedule_executions_running", table_name="schedule_executions")
    op.drop_index(
        "ix_schedule_executions_schedule_status_started", table_name="schedule_executions"
    )
    op.drop_index("ix_schedule_executions_schedule_started", table_name="schedule_executions")
    op.drop_table("schedule_executions")
