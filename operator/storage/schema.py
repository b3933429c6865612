"""The history schema: the tables as SQLAlchemy models and the status and event vocabularies
their check constraints hold. The migrations create exactly this;
tests/integration/test_history_schema.py checks it.

Money is ``NUMERIC(14, 6)`` in SQL and ``Decimal`` in Python; times are ``timestamptz``. Rows
name the schedule by UID (a re-created schedule is a new schedule) and by namespace/name for
people. The leaf of the storage package: it imports nothing else of it.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from agent_runner.contract import RunOutcome

__all__ = [
    "AGENT_STATE",
    "EVENTS",
    "EXECUTIONS",
    "NAMESPACE_BUDGETS",
    "PURGED_TOTALS",
    "REVISION_SEQUENCE",
    "RUNS_CHANNEL",
    "RUN_CHECKPOINTS",
    "AgentState",
    "Base",
    "Event",
    "EventKind",
    "Execution",
    "NamespaceBudget",
    "PurgedTotals",
    "RunCheckpoint",
]


class EventKind(StrEnum):
    """Audit trail event kinds known today; the column accepts any lower_snake_case kind."""

    CREATED = "created"
    UPDATED = "updated"
    PAUSED = "paused"
    RESUMED = "resumed"
    AUTO_PAUSED = "auto_paused"
    BUDGET_EXHAUSTED = "budget_exhausted"
    BUDGET_RESET = "budget_reset"
    RUN_REQUESTED = "run_requested"
    RUN_CANCELLED = "run_cancelled"
    SILENT_STOP = "silent_stop"
    DELETED = "deleted"
    DRIFT_REPAIRED = "drift_repaired"


# Kinds a schedule has at most one row of (per UID); see migration 0004.
ONCE_PER_SCHEDULE = frozenset({EventKind.CREATED, EventKind.DELETED})
_ONCE_KINDS_SQL = ", ".join(sorted(f"'{k.value}'" for k in ONCE_PER_SCHEDULE))
ONCE_PER_SCHEDULE_SQL = f"kind IN ({_ONCE_KINDS_SQL}) AND schedule_uid IS NOT NULL"
# Audit rows the retention purge takes by age; a `created` row goes with its `deleted` (0007).
PURGEABLE_EVENTS_SQL = "kind <> 'created' OR schedule_uid IS NULL"
_STATUS_SQL = ", ".join(f"'{s.value}'" for s in RunOutcome)


class Base(DeclarativeBase):
    """Declarative base of the history tables."""

    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        str: sa.Text(),
        datetime: sa.DateTime(timezone=True),
        Decimal: sa.Numeric(14, 6),
        dict[str, Any]: pg.JSONB(),
    }


REVISION_SEQUENCE = sa.Sequence("schedule_executions_revision_seq", metadata=Base.metadata)
RUNS_CHANNEL = "nocturne_runs"
"""The NOTIFY channel of run changes: payload ``<id> <revision>``."""


class Execution(Base):
    """One run attempt (one pod of a Job): RUNNING at start, a final status at the end."""

    __tablename__ = "schedule_executions"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    namespace: Mapped[str]
    schedule_name: Mapped[str]
    schedule_uid: Mapped[str]
    job_name: Mapped[str]
    job_uid: Mapped[str]
    pod_uid: Mapped[str]
    attempt: Mapped[int] = mapped_column(sa.Integer)
    manual_request: Mapped[str | None]
    status: Mapped[str]
    started_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    cost_usd: Mapped[Decimal] = mapped_column(server_default=sa.text("0"))
    input_tokens: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    model: Mapped[str]
    provider: Mapped[str]
    error: Mapped[str | None]
    output: Mapped[str | None]
    alert: Mapped[bool] = mapped_column(server_default=sa.false())
    alert_reason: Mapped[str | None]
    # `metadata` is reserved on declarative classes; the column keeps the documented name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=sa.text("'{}'::jsonb"))
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    # What reserve() granted this attempt; NULL for rows without a grant (written by start(),
    # or before grants existed), which count at their cost (added by migration 0003).
    granted_usd: Mapped[Decimal | None]
    # The worst case of the model call in flight, from the last progress report (0 between
    # calls and once final): an attempt that ends without its report is charged it (0006).
    reserved_usd: Mapped[Decimal] = mapped_column(server_default=sa.text("0"))
    # Drawn again on every insert and update (a trigger): the agentruns API's resourceVersion,
    # its watch and its list's version (0009).
    revision: Mapped[int] = mapped_column(
        sa.BigInteger, REVISION_SEQUENCE, server_default=REVISION_SEQUENCE.next_value()
    )

    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="pk_schedule_executions"),
        # The idempotency key: a replayed start() finds the row instead of adding one.
        sa.UniqueConstraint("job_uid", "pod_uid", name="uq_schedule_executions_job_uid_pod_uid"),
        sa.CheckConstraint(f"status IN ({_STATUS_SQL})", name="ck_schedule_executions_status"),
        sa.CheckConstraint(
            "(status = 'RUNNING') = (completed_at IS NULL)",
            name="ck_schedule_executions_completed_at_iff_final",
        ),
        sa.CheckConstraint("cost_usd >= 0", name="ck_schedule_executions_cost_usd"),
        sa.CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0", name="ck_schedule_executions_tokens"
        ),
        sa.CheckConstraint("attempt >= 0", name="ck_schedule_executions_attempt"),
        sa.CheckConstraint("granted_usd >= 0", name="ck_schedule_executions_granted_usd"),
        sa.CheckConstraint("reserved_usd >= 0", name="ck_schedule_executions_reserved_usd"),
        # "Runs of schedule X between A and B, newest first" and "cost of schedule X": the
        # keyset (started_at, id) matches runs()' order; cost_usd and status are carried so sums
        # and per-status counts are index-only scans.
        sa.Index(
            "ix_schedule_executions_schedule_started",
            "namespace",
            "schedule_name",
            sa.desc("started_at"),
            sa.desc("id"),
            postgresql_include=["cost_usd", "status"],
        ),
        # "Runs of schedule X with status S, newest first": the operator's last successful run
        # (silent-stop alarm) and `nocturne history --status`, fast even when S is rare.
        sa.Index(
            "ix_schedule_executions_schedule_status_started",
            "namespace",
            "schedule_name",
            "status",
            sa.desc("started_at"),
            sa.desc("id"),
        ),
        # The reaper's "RUNNING for too long": tiny, only unfinished rows.
        sa.Index(
            "ix_schedule_executions_running",
            "started_at",
            postgresql_where=sa.text("status = 'RUNNING'"),
        ),
        # The same by schedule UID (a re-created schedule is a new schedule): reserve() sums a
        # schedule's committed spend (cost_usd, or granted_usd while RUNNING) index-only, and
        # run_stats counts one incarnation. Added by migration 0003.
        sa.Index(
            "ix_schedule_executions_uid_started",
            "schedule_uid",
            sa.desc("started_at"),
            sa.desc("id"),
            postgresql_include=["cost_usd", "status", "granted_usd"],
        ),
        # The in-flight attempts of a schedule UID (running()): tiny, only unfinished rows.
        sa.Index(
            "ix_schedule_executions_uid_running",
            "schedule_uid",
            "started_at",
            "id",
            postgresql_where=sa.text("status = 'RUNNING'"),
        ),
        # spent_for_job(job_uid) uses the unique index above (job_uid leads it): no extra index.
        # The retention purge's "ended longest ago first" (0007): it reads only what is due. Not
        # on started_at: the planner would take that for runs()' "newest first" of a schedule.
        sa.Index("ix_schedule_executions_completed", "completed_at"),
        # "Every run changed since version N" (the agentruns watch), in version order (0009).
        sa.Index("ix_schedule_executions_revision", "revision"),
        # A namespace's runs newest first (the agentruns API's list without a schedule, 0009).
        sa.Index(
            "ix_schedule_executions_namespace_started",
            "namespace",
            sa.desc("started_at"),
            sa.desc("id"),
        ),
    )


@sa.event.listens_for(Execution.__table__, "after_create")
def _create_revision_triggers(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
    # The same functions and triggers as migration 0009.
    table = connection.dialect.identifier_preparer.format_table(target)
    for statement in (
        f"""CREATE FUNCTION fn_schedule_executions_revision() RETURNS trigger AS $$
        BEGIN NEW.revision := nextval('{REVISION_SEQUENCE.name}'); NEW.updated_at := now();
        RETURN NEW; END
        $$ LANGUAGE plpgsql""",
        f"""CREATE TRIGGER tg_schedule_executions_revision BEFORE UPDATE ON {table}
        FOR EACH ROW EXECUTE FUNCTION fn_schedule_executions_revision()""",
        f"""CREATE FUNCTION fn_schedule_executions_notify() RETURNS trigger AS $$
        BEGIN PERFORM pg_notify('{RUNS_CHANNEL}', NEW.id::text || ' ' || NEW.revision::text);
        RETURN NULL; END
        $$ LANGUAGE plpgsql""",
        f"""CREATE TRIGGER tg_schedule_executions_notify AFTER INSERT OR UPDATE ON {table}
        FOR EACH ROW EXECUTE FUNCTION fn_schedule_executions_notify()""",
    ):
        connection.execute(sa.text(statement))


@sa.event.listens_for(Execution.__table__, "after_create")
def _create_statistics(target: sa.Table, connection: sa.Connection, **_: Any) -> None:
    # namespace and schedule_name are correlated; without these statistics the planner
    # multiplies their selectivities and underestimates a schedule's rows.
    table = connection.dialect.identifier_preparer.format_table(target)
    connection.execute(
        sa.text(
            "CREATE STATISTICS st_schedule_executions_schedule (ndistinct, dependencies) "
            f"ON namespace, schedule_name FROM {table}"
        )
    )


class Event(Base):
    """Audit trail of a schedule's lifecycle (created, paused, auto_paused, ...)."""

    __tablename__ = "schedule_events"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    namespace: Mapped[str]
    schedule_name: Mapped[str]
    schedule_uid: Mapped[str | None]
    kind: Mapped[str]
    reason: Mapped[str | None]
    actor: Mapped[str | None]
    at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    details: Mapped[dict[str, Any]] = mapped_column(server_default=sa.text("'{}'::jsonb"))

    __table_args__ = (
        sa.PrimaryKeyConstraint("id", name="pk_schedule_events"),
        sa.CheckConstraint("kind ~ '^[a-z][a-z0-9_]*$'", name="ck_schedule_events_kind"),
        sa.Index("ix_schedule_events_schedule_at", "namespace", "schedule_name", "at"),
        # A schedule is created and deleted once, however often kopf reports it (0004).
        sa.Index(
            "uq_schedule_events_once",
            "schedule_uid",
            "kind",
            unique=True,
            postgresql_where=sa.text(ONCE_PER_SCHEDULE_SQL),
        ),
        # The retention purge's "oldest first" (0007), of the rows it may take: a schedule's
        # `created` goes with its `deleted`. Partial, so events()' "newest first" never uses it.
        sa.Index(
            "ix_schedule_events_purgeable_at",
            "at",
            postgresql_where=sa.text(PURGEABLE_EVENTS_SQL),
        ),
    )


class AgentState(Base):
    """What an agent saved for its next run, per schedule and optional ``task.stateKey``."""

    __tablename__ = "agent_state"

    namespace: Mapped[str]
    schedule_name: Mapped[str]
    state_key: Mapped[str]
    state: Mapped[dict[str, Any]]
    output: Mapped[str | None]
    execution_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    # The incarnation that saved it (0005); NULL for rows saved before, handed to any.
    schedule_uid: Mapped[str | None]

    __table_args__ = (
        sa.PrimaryKeyConstraint("namespace", "schedule_name", "state_key", name="pk_agent_state"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["schedule_executions.id"],
            name="fk_agent_state_execution_id",
            ondelete="SET NULL",
        ),
        # Deleting a run (the retention purge) looks up the state that names it (0007).
        sa.Index("ix_agent_state_execution_id", "execution_id"),
    )


class PurgedTotals(Base):
    """What the purged runs of one schedule incarnation added up to (migration 0007): the
    retention purge adds a run's cost, tokens and outcome here in the transaction that deletes
    it, so lifetime sums (maxTotalUSD, the totals on status) never drop. Never purged itself."""

    __tablename__ = "schedule_purged_totals"

    schedule_uid: Mapped[str]
    namespace: Mapped[str]
    schedule_name: Mapped[str]
    cost_usd: Mapped[Decimal] = mapped_column(server_default=sa.text("0"))
    input_tokens: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    # Rows (attempts) purged, and the runs among them as run_stats counts them: one per Job,
    # by its last attempt's outcome.
    attempts: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    succeeded: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    failed: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    # The span of the purged runs' starts.
    first_started_at: Mapped[datetime]
    last_started_at: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    __table_args__ = (
        sa.PrimaryKeyConstraint("schedule_uid", name="pk_schedule_purged_totals"),
        sa.CheckConstraint("cost_usd >= 0", name="ck_schedule_purged_totals_cost_usd"),
        sa.CheckConstraint(
            "input_tokens >= 0 AND output_tokens >= 0", name="ck_schedule_purged_totals_tokens"
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND succeeded >= 0 AND failed >= 0",
            name="ck_schedule_purged_totals_counts",
        ),
        # total_cost by name sums every incarnation of it.
        sa.Index("ix_schedule_purged_totals_schedule", "namespace", "schedule_name"),
    )


class RunCheckpoint(Base):
    """A Job's run after its last completed step (migration 0008): a retry of the Job (a new
    pod) resumes from it. One row per Job; removed once the Job is recorded as finished."""

    __tablename__ = "run_checkpoints"

    job_uid: Mapped[str]
    execution_id: Mapped[int] = mapped_column(sa.BigInteger)
    step: Mapped[int] = mapped_column(sa.Integer)
    checkpoint: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    __table_args__ = (
        sa.PrimaryKeyConstraint("job_uid", name="pk_run_checkpoints"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["schedule_executions.id"],
            name="fk_run_checkpoints_execution_id",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("step >= 1", name="ck_run_checkpoints_step"),
        # The safety net's "older than": a Job whose end was never recorded.
        sa.Index("ix_run_checkpoints_updated_at", "updated_at"),
        # The foreign key's ON DELETE CASCADE: a purged run finds its checkpoint without a scan.
        sa.Index("ix_run_checkpoints_execution_id", "execution_id"),
    )


class NamespaceBudget(Base):
    """A namespace's money limits from AgentSchedulePolicies (migration 0010), kept in step with
    the policies by the operator: a monthly USD cap on all its schedules together (its zone,
    its policy) and a per-run cap replacing the cluster's; ``reserve()`` applies them."""

    __tablename__ = "namespace_budgets"

    namespace: Mapped[str]
    max_monthly_usd: Mapped[Decimal | None] = mapped_column(sa.Numeric(14, 6))
    time_zone: Mapped[str]
    policy: Mapped[str | None]
    max_per_run_usd: Mapped[Decimal | None] = mapped_column(sa.Numeric(14, 6))
    per_run_policy: Mapped[str | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    __table_args__ = (
        sa.PrimaryKeyConstraint("namespace", name="pk_namespace_budgets"),
        sa.CheckConstraint("max_monthly_usd >= 0", name="ck_namespace_budgets_max_monthly_usd"),
        sa.CheckConstraint("max_per_run_usd > 0", name="ck_namespace_budgets_max_per_run_usd"),
        sa.CheckConstraint(
            "max_monthly_usd IS NOT NULL OR max_per_run_usd IS NOT NULL",
            name="ck_namespace_budgets_a_limit",
        ),
    )


# The tables as Core objects: the repository writes statements, not ORM sessions.
EXECUTIONS = cast(sa.Table, Execution.__table__)
EVENTS = cast(sa.Table, Event.__table__)
AGENT_STATE = cast(sa.Table, AgentState.__table__)
PURGED_TOTALS = cast(sa.Table, PurgedTotals.__table__)
RUN_CHECKPOINTS = cast(sa.Table, RunCheckpoint.__table__)
NAMESPACE_BUDGETS = cast(sa.Table, NamespaceBudget.__table__)
