"""A schedule's creation and deletion are audited once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Under load kopf can handle one creation twice (its own annotation patch comes back late), and
the audit trail then said a schedule was created twice. ``uq_schedule_events_once``: at most one
``created`` and one ``deleted`` row per schedule UID; the repository inserts them with ON
CONFLICT DO NOTHING. Rows written twice before this revision are reduced to the first one.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

ONCE = "kind IN ('created', 'deleted') AND schedule_uid IS NOT NULL"


def upgrade() -> None:
    op.execute(
        sa.text("""
        DELETE FROM schedule_events AS later
        USING schedule_events AS first
        WHERE later.kind IN ('created', 'deleted')
          AND later.schedule_uid IS NOT NULL
          AND later.schedule_uid = first.schedule_uid
          AND later.kind = first.kind
          AND later.id > first.id
        """)
    )
    op.create_index(
        "uq_schedule_events_once",
        "schedule_events",
        ["schedule_uid", "kind"],
        unique=True,
        postgresql_where=sa.text(ONCE),
    )


def downgrade() -> None:
    op.drop_index("uq_schedule_events_once", table_name="schedule_events")
