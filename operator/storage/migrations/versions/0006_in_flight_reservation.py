"""What a RUNNING attempt has reserved for the model call in flight.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

``schedule_executions.reserved_usd``: the worst case of the call a runner is making now, as its
last progress report said (0 between calls and once final). An attempt that ends without its
final report (SIGKILL, OOM, a lost node) is charged its cost so far plus this, at most its
grant: the provider may bill the call that was in flight, and later grants must not be
computed from a cost that leaves it out.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "schedule_executions",
        sa.Column("reserved_usd", sa.Numeric(14, 6), server_default=sa.text("0"), nullable=False),
    )
    op.create_check_constraint(
        "ck_schedule_executions_reserved_usd", "schedule_executions", "reserved_usd >= 0"
    )


def downgrade() -> None:
    op.drop_constraint("ck_schedule_executions_reserved_usd", "schedule_executions", type_="check")
    op.drop_column("schedule_executions", "reserved_usd")
