"""Webhook notifications: the operator's outbox of notices, with dedupe and cooldown history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Frozen DDL: it must not import the table definition in nocturne_operator.notifications.notify, which
describes the newest schema. tests/integration/test_notify.py checks that the two agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_KINDS = "'Succeeded', 'Failed', 'BudgetExceeded', 'AutoPaused', 'Recovered', 'SilentStop', 'Alert'"
_STATUSES = "'PENDING', 'SENT', 'FAILED', 'SUPPRESSED'"


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("schedule_uid", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("resolved", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("secret_name", sa.Text(), nullable=False),
        sa.Column("secret_key", sa.Text(), nullable=False),
        sa.Column("format", sa.Text(), nullable=False),
        sa.Column("payload", pg.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notifications"),
        sa.UniqueConstraint(
            "schedule_uid",
            "kind",
            "dedupe_key",
            name="uq_notifications_schedule_uid_kind_dedupe_key",
        ),
        sa.CheckConstraint(f"kind IN ({_KINDS})", name="ck_notifications_kind"),
        sa.CheckConstraint(f"status IN ({_STATUSES})", name="ck_notifications_status"),
        sa.CheckConstraint("format IN ('slack', 'json')", name="ck_notifications_format"),
        sa.CheckConstraint("attempts >= 0", name="ck_notifications_attempts"),
        sa.CheckConstraint(
            "(status = 'SENT') = (sent_at IS NOT NULL)", name="ck_notifications_sent_at_iff_sent"
        ),
    )
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_notifications_schedule_uid_kind_created",
        "notifications",
        ["schedule_uid", "kind", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_notifications_schedule_uid_kind_created", table_name="notifications")
    op.drop_index("ix_notifications_due", table_name="notifications")
    op.drop_table("notifications")
