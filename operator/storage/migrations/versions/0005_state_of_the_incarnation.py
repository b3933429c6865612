"""Agent state belongs to one incarnation of a schedule.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``agent_state.schedule_uid``: the UID of the schedule that saved it. A schedule deleted and
re-created under its name is a new schedule: it does not receive the state its predecessor
saved (its first success replaces the row). Rows saved before this revision have no UID and are
handed to whichever schedule holds the name, as before.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("agent_state", sa.Column("schedule_uid", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("agent_state", "schedule_uid")
