"""Checkpoints: a Job's run after its last completed step, for a retry to resume from.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

``run_checkpoints``: one row per Job UID (a retry is a new pod of the same Job), replaced by a
later step only, removed once the Job is recorded as finished (and by the sweep after a week,
for a Job whose end was never recorded); its execution's row going away takes it along.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "run_checkpoints",
        sa.Column("job_uid", sa.Text(), nullable=False),
        sa.Column("execution_id", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("checkpoint", pg.JSONB(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("job_uid", name="pk_run_checkpoints"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["schedule_executions.id"],
            name="fk_run_checkpoints_execution_id",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("step >= 1", name="ck_run_checkpoints_step"),
    )
    op.create_index("ix_run_checkpoints_updated_at", "run_checkpoints", ["updated_at"])
    op.create_index("ix_run_checkpoints_execution_id", "run_checkpoints", ["execution_id"])


def downgrade() -> None:
    op.drop_index("ix_run_checkpoints_execution_id", table_name="run_checkpoints")
    op.drop_index("ix_run_checkpoints_updated_at", table_name="run_checkpoints")
    op.drop_table("run_checkpoints")
