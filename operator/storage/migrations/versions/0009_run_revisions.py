"""Run revisions: what the agentruns API's resourceVersion, watch and pagination stand on.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

- ``schedule_executions.revision``: drawn from ``schedule_executions_revision_seq`` when a row is
  inserted and again whenever it is updated (trigger ``tg_schedule_executions_revision``, which
  also sets ``updated_at`` to the writing transaction's start), so the
  largest revision is the history's version and "every row changed since version N" is one
  index range (``ix_schedule_executions_revision``). Existing rows get one each.
- ``ix_schedule_executions_namespace_started``: a namespace's runs newest first (a list of
  agentruns without a schedule selector).
- ``tg_schedule_executions_notify``: after every insert or update, ``NOTIFY nocturne_runs`` with
  the row's id and revision: the API's one listener wakes its watchers instead of each polling.

Adding the column rewrites the table (a volatile default): seconds per million rows, writes wait.

Frozen DDL: it must not import the models, which describe the newest schema. A test checks that
the migrated schema and the models agree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

SEQUENCE = "schedule_executions_revision_seq"


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence(SEQUENCE)))
    op.add_column(
        "schedule_executions",
        sa.Column(
            "revision",
            sa.BigInteger(),
            server_default=sa.text(f"nextval('{SEQUENCE}'::regclass)"),
            nullable=False,
        ),
    )
    op.create_index("ix_schedule_executions_revision", "schedule_executions", ["revision"])
    op.create_index(
        "ix_schedule_executions_namespace_started",
        "schedule_executions",
        ["namespace", sa.text("started_at DESC"), sa.text("id DESC")],
    )
    op.execute(
        f"""
        CREATE FUNCTION fn_schedule_executions_revision() RETURNS trigger AS $$
        BEGIN
            NEW.revision := nextval('{SEQUENCE}');
            NEW.updated_at := now();
            RETURN NEW;
        END
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER tg_schedule_executions_revision BEFORE UPDATE ON schedule_executions
        FOR EACH ROW EXECUTE FUNCTION fn_schedule_executions_revision()
        """
    )
    op.execute(
        """
        CREATE FUNCTION fn_schedule_executions_notify() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('nocturne_runs', NEW.id::text || ' ' || NEW.revision::text);
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER tg_schedule_executions_notify AFTER INSERT OR UPDATE
        ON schedule_executions
        FOR EACH ROW EXECUTE FUNCTION fn_schedule_executions_notify()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tg_schedule_executions_notify ON schedule_executions")
    op.execute("DROP FUNCTION fn_schedule_executions_notify()")
    op.execute("DROP TRIGGER tg_schedule_executions_revision ON schedule_executions")
    op.execute("DROP FUNCTION fn_schedule_executions_revision()")
    op.drop_index("ix_schedule_executions_namespace_started", table_name="schedule_executions")
    op.drop_index("ix_schedule_executions_revision", table_name="schedule_executions")
    op.drop_column("schedule_executions", "revision")
    op.execute(sa.schema.DropSequence(sa.Sequence(SEQUENCE)))
