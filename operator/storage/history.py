"""Execution history in PostgreSQL: the schema (SQLAlchemy models, Alembic migrations) and the
repository the operator -- its only client -- writes through (the run API, the results of
finished Jobs, the reaper) and reads from (status, the CLI).

Writes are short transactions keyed so that replaying them changes nothing: ``reserve`` and
``start`` are keyed by Job UID + pod UID, ``record_progress`` and ``finish`` never lower a cost,
and the first final status wins. Budgets are reserved centrally: ``reserve`` decides an
attempt's grant under a per-schedule-UID lock, counting every in-flight grant, so concurrent
Jobs and retries never overspend a schedule's caps. Rows name the schedule by UID (a re-created
schedule is a new schedule) and by namespace/name for people. Money is ``NUMERIC(14, 6)`` in
SQL and ``Decimal`` in Python; times are aware.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from agent_runner.contract import (
    MAX_TOKENS,
    MAX_USD,
    STATE_LIMIT_BYTES,
    STATE_OUTPUT_LIMIT_BYTES,
    USD_QUANTUM,
    NoGrantReason,
    StateTooLargeError,
    compact_json,
    json_document,
    quantize_usd,
    validate_state,
)

__all__ = [
    "ERROR_LIMIT_BYTES",
    "OUTPUT_LIMIT_BYTES",
    "STATE_LIMIT_BYTES",
    "STATE_OUTPUT_LIMIT_BYTES",
    "AgentState",
    "Base",
    "Caps",
    "CostPeriod",
    "Event",
    "EventKind",
    "EventRecord",
    "Execution",
    "ExecutionKey",
    "ExecutionNotFoundError",
    "ExecutionRecord",
    "ExecutionStatus",
    "GrantRecord",
    "History",
    "HistoryError",
    "HistoryUnavailableError",
    "SavedState",
    "StateTooLargeError",
    "quantize_usd",
    "redact_url",
    "upgrade",
    "validate_state",
]

log = logging.getLogger(__name__)

# Shipped as the packages nocturne_operator.storage.migrations(.versions) plus
# script.py.mako (pyproject);
# resolve() also finds them through the strict editable install's symlink tree.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key serialising concurrent `upgrade()` calls on one database ("noct" + "hist").
_MIGRATION_LOCK_KEY = 0x6E6F6374_68697374
# Seed of hashtextextended(schedule_uid, seed): the pg_advisory_xact_lock key under which
# reserve() decides a schedule's grants ("noct" + "budg"). A collision only serialises two
# schedules' reservations; it never mixes their sums.
_BUDGET_LOCK_SEED = 0x6E6F6374_62756467

OUTPUT_LIMIT_BYTES = 1024 * 1024
"""A run's output is truncated beyond this (UTF-8 bytes): losing the record would be worse."""
ERROR_LIMIT_BYTES = 64 * 1024
"""A run's error text is truncated beyond this (UTF-8 bytes)."""

_MAX_PAGE = 1000


class ExecutionStatus(StrEnum):
    """Status of one run attempt; every value but RUNNING is final."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"


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
    SILENT_STOP = "silent_stop"
    DELETED = "deleted"
    DRIFT_REPAIRED = "drift_repaired"


_EVENT_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_STATUS_SQL = ", ".join(f"'{s.value}'" for s in ExecutionStatus)


# --------------------------------------------------------------------------------------------
# Errors


class HistoryError(RuntimeError):
    """A history operation failed; the message names the operation and the cause."""


class HistoryUnavailableError(HistoryError):
    """The database could not be reached or did not answer in time (connection, timeout)."""


class ExecutionNotFoundError(HistoryError, LookupError):
    """No execution row has the given id."""


# --------------------------------------------------------------------------------------------
# Schema. Migrations 0001 and 0003 create exactly this; tests/integration/test_history_schema.py
# checks it.


class Base(DeclarativeBase):
    """Declarative base of the history tables."""

    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        str: sa.Text(),
        datetime: sa.DateTime(timezone=True),
        Decimal: sa.Numeric(14, 6),
        dict[str, Any]: pg.JSONB(),
    }


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
    # or before grants existed), which count at their cost. Last: migration 0003 added it.
    granted_usd: Mapped[Decimal | None]

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
        # run_stats(schedule_uid=...) counts one incarnation. Added by migration 0003.
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
    )


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

    __table_args__ = (
        sa.PrimaryKeyConstraint("namespace", "schedule_name", "state_key", name="pk_agent_state"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["schedule_executions.id"],
            name="fk_agent_state_execution_id",
            ondelete="SET NULL",
        ),
    )


_EXECUTIONS = cast(sa.Table, Execution.__table__)
_EVENTS = cast(sa.Table, Event.__table__)
_STATE = cast(sa.Table, AgentState.__table__)


# --------------------------------------------------------------------------------------------
# Values passed in and out


@dataclass(frozen=True)
class ExecutionKey:
    """Identity of one run attempt; (job_uid, pod_uid) is the idempotency key."""

    namespace: str
    schedule_name: str
    schedule_uid: str
    job_name: str
    job_uid: str
    pod_uid: str
    attempt: int
    manual_request: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "namespace",
            "schedule_name",
            "schedule_uid",
            "job_name",
            "job_uid",
            "pod_uid",
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ExecutionKey.{name}: {value!r} must be a non-empty string")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 0:
            raise ValueError(f"ExecutionKey.attempt: {self.attempt!r} must be an integer >= 0")


@dataclass(frozen=True)
class ExecutionRecord:
    """One row of ``schedule_executions`` (``output`` is None unless asked for)."""

    id: int
    namespace: str
    schedule_name: str
    schedule_uid: str
    job_name: str
    job_uid: str
    pod_uid: str
    attempt: int
    manual_request: str | None
    status: ExecutionStatus
    started_at: datetime
    completed_at: datetime | None
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    model: str
    provider: str
    error: str | None
    output: str | None
    alert: bool
    alert_reason: str | None
    metadata: dict[str, Any]
    updated_at: datetime
    # What reserve() granted the attempt; None for rows without a grant (they count at cost).
    granted_usd: Decimal | None = None


@dataclass(frozen=True)
class Caps:
    """A schedule's budget caps as ``reserve()`` applies them (money as ``Decimal``)."""

    per_run: Decimal
    """maxPerRunUSD: covers every attempt of one Job together."""
    total: Decimal | None = None
    """maxTotalUSD: every Job of this schedule UID, ever."""
    monthly: Decimal | None = None
    """maxMonthlyUSD: every Job of this schedule UID started since ``month_start``."""
    month_start: datetime | None = None
    """Aware start of the current month in the schedule's zone; required with ``monthly``."""

    def __post_init__(self) -> None:
        for name in ("per_run", "total", "monthly"):
            value = getattr(self, name)
            if value is None and name != "per_run":
                continue
            if not isinstance(value, Decimal):
                raise TypeError(f"Caps.{name}: {value!r} must be a Decimal (never a float)")
            if not value.is_finite() or value < 0:
                raise ValueError(f"Caps.{name}: {value} must be a finite amount >= 0")
        if self.monthly is not None and self.month_start is None:
            raise ValueError("Caps.month_start: required when Caps.monthly is set")
        if self.month_start is not None:
            _aware("Caps.month_start", self.month_start)


@dataclass(frozen=True)
class GrantRecord:
    """What ``reserve()`` decided for one attempt (or decided before, when ``replay``)."""

    execution_id: int
    attempt: int
    """0 for the Job's first attempt, then 1, 2 ..."""
    limit: Decimal
    """What this attempt may spend (6 decimals, rounded down); 0 when refused."""
    spent_before: Decimal
    """Committed by the Job's earlier attempts (spent, or granted while they still run)."""
    refused: NoGrantReason | None
    """None, or the cap that left nothing: per-run first, then total, then monthly."""
    message: str | None
    """Why it was refused, naming the cap and the amounts."""
    replay: bool
    """This (job_uid, pod_uid) had reserved before; its grant is returned unchanged."""


@dataclass(frozen=True)
class SavedState:
    """An agent's saved state with the output of the run that saved it."""

    state: Any
    output: str | None
    execution_id: int | None
    updated_at: datetime


@dataclass(frozen=True)
class RunStats:
    """A schedule's runs as people count them: one run per Job, whose outcome is its last
    attempt's. ``last_run`` is the latest finished Job's last attempt."""

    total_cost: Decimal
    succeeded: int
    failed: int
    consecutive_failures: int
    last_run: ExecutionRecord | None
    # Start of the latest successful attempt (the silent-stop alarm's reference).
    last_success_at: datetime | None = None
    # Cost of runs started since ``month_start`` (the monthly budget); None when not asked.
    month_cost: Decimal | None = None


# Outcomes that count as a failed run; CANCELLED (deletion, eviction) does not.
FAILED_OUTCOMES = frozenset(
    {ExecutionStatus.FAILED, ExecutionStatus.BUDGET_EXCEEDED, ExecutionStatus.TIMED_OUT}
)


class CostPeriod(NamedTuple):
    """Cost of the runs started in one calendar period (start is local midnight in ``tz``)."""

    period_start: datetime
    cost_usd: Decimal


@dataclass(frozen=True)
class EventRecord:
    """One row of ``schedule_events``."""

    id: int
    namespace: str
    schedule_name: str
    schedule_uid: str | None
    kind: str
    reason: str | None
    actor: str | None
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers


_URL_PASSWORD_RE = re.compile(r"(?P<head>://[^/@:\s]*:)[^@\s]*@")


def redact_url(url: str | sa.URL) -> str:
    """The URL with its password replaced by ``***``, safe to log (also for unparsable URLs)."""
    if isinstance(url, sa.URL):
        return url.render_as_string(hide_password=True)
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL still must not leak its password
        return _URL_PASSWORD_RE.sub(r"\g<head>***@", url)


def _usd(name: str, value: Decimal) -> Decimal:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name}: {value!r} must be a Decimal (money is never a float)")
    if not value.is_finite() or value < 0:
        raise ValueError(f"{name}: {value} must be a finite amount >= 0")
    try:
        quantized = quantize_usd(value)
    except InvalidOperation:
        quantized = MAX_USD + 1
    if quantized > MAX_USD:
        raise ValueError(f"{name}: {value} exceeds the largest storable amount {MAX_USD}")
    return quantized


def _tokens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{name}: {value!r} must be an integer between 0 and {MAX_TOKENS}")
    return value


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: {value!r} must be a timezone-aware datetime")
    return value


def clean_text(value: str | None, limit_bytes: int) -> str | None:
    """Text PostgreSQL can store: NUL replaced, invalid surrogates replaced, long text cut at a
    character boundary with a visible marker."""
    if value is None:
        return None
    data = value.replace("\x00", "\ufffd").encode("utf-8", "replace")
    if len(data) <= limit_bytes:
        return data.decode("utf-8")
    marker = f"\n…[truncated, {len(data)} bytes in total]"
    keep = limit_bytes - len(marker.encode("utf-8"))
    return data[:keep].decode("utf-8", "ignore") + marker


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"tz: {tz!r} is not an IANA time zone name") from None


def month_start(moment: datetime, tz: str) -> datetime:
    """Local midnight on the 1st of ``moment``'s month in ``tz`` (the monthly budget's period)."""
    local = _aware("moment", moment).astimezone(_zone(tz))
    return datetime(local.year, local.month, 1, tzinfo=local.tzinfo)


def next_month_start(moment: datetime, tz: str) -> datetime:
    """Local midnight on the 1st of the month after ``moment``'s, in ``tz``."""
    start = month_start(moment, tz)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month)


def _cost_sum(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """SUM(cost_usd) of the rows matching ``where`` (FILTER), 0 when there are none."""
    return sa.func.coalesce(sa.func.sum(_EXECUTIONS.c.cost_usd).filter(*where), 0)


def _committed_sum(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """SUM of what the rows matching ``where`` hold of a budget, 0 when there are none: a final
    row its cost; a RUNNING row its grant too, which it may still spend (a row without a grant
    counts at its cost)."""
    t = _EXECUTIONS
    held = sa.case(
        (
            t.c.status == ExecutionStatus.RUNNING.value,
            sa.func.greatest(sa.func.coalesce(t.c.granted_usd, t.c.cost_usd), t.c.cost_usd),
        ),
        else_=t.c.cost_usd,
    )
    return sa.func.coalesce(sa.func.sum(held).filter(*where), 0)


def _warn_overrun(what: str, cost: Decimal, granted: Decimal | None) -> None:
    if granted is not None and cost > granted:
        log.warning(
            "%s: cost %s is above the attempt's grant %s (recorded as reported, metadata.overrun)",
            what,
            _amount(cost),
            _amount(granted),
        )


def _floor_usd(value: Decimal) -> Decimal:
    """Round down to the stored 6 decimals: a grant never exceeds what a cap leaves."""
    return value.quantize(USD_QUANTUM, rounding=ROUND_FLOOR)


def _amount(value: Decimal) -> str:
    """A USD amount for messages: at least 2 decimals, no trailing zeros beyond them."""
    text = f"{value.normalize():f}"
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


class _Held(NamedTuple):
    """Sums over some rows: what they committed (spent, or granted while running) and spent."""

    committed: Decimal
    spent: Decimal

    @property
    def reserved(self) -> Decimal:
        return self.committed - self.spent

    def describe(self, cap_name: str, cap: Decimal, by: str, period: str = "") -> str:
        return (
            f"{cap_name} {_amount(cap)} reached{period}: {_amount(self.spent)} spent and "
            f"{_amount(self.reserved)} reserved by {by}"
        )


_NO_GRANT_REASONS: frozenset[str] = frozenset(
    ("BudgetExhausted", "TotalBudgetReached", "MonthlyBudgetReached")
)
_OVERRUN: sa.ColumnElement[Any] = sa.literal_column("""'{"overrun": true}'::jsonb""")


def _check_page_limit(limit: int) -> None:
    if isinstance(limit, bool) or not 1 <= limit <= _MAX_PAGE:
        raise ValueError(f"limit: {limit!r} must be between 1 and {_MAX_PAGE}")


def _execution_columns(include_output: bool) -> list[sa.ColumnElement[Any]]:
    c = _EXECUTIONS.c
    output: sa.ColumnElement[Any] = (
        c.output if include_output else sa.null().cast(sa.Text).label("output")
    )
    return [
        c.id,
        c.namespace,
        c.schedule_name,
        c.schedule_uid,
        c.job_name,
        c.job_uid,
        c.pod_uid,
        c.attempt,
        c.manual_request,
        c.status,
        c.started_at,
        c.completed_at,
        c.cost_usd,
        c.input_tokens,
        c.output_tokens,
        c.model,
        c.provider,
        c.error,
        output,
        c.alert,
        c.alert_reason,
        c["metadata"].label("metadata"),
        c.updated_at,
        c.granted_usd,
    ]


def _record(row: sa.Row[Any]) -> ExecutionRecord:
    values = dict(row._mapping)
    values["status"] = ExecutionStatus(values["status"])
    return ExecutionRecord(**values)


def _engine(
    url: str,
    *,
    connect_timeout: int,
    statement_timeout_ms: int | None,
    application_name: str,
    pool: bool,
) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except Exception:  # the parser's message would repeat the password
        raise HistoryError(f"database URL {redact_url(url)} is not a valid URL") from None
    if parsed.get_backend_name() != "postgresql":
        raise HistoryError(
            f"database URL {redact_url(parsed)}: the history needs PostgreSQL "
            "(postgresql+psycopg://user:password@host:port/database)"
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if statement_timeout_ms is not None:
        # Appended to the server options (keeping e.g. a search_path the URL already sets).
        options = str(parsed.query.get("options", ""))
        options = f"{options} -c statement_timeout={int(statement_timeout_ms)}".strip()
        parsed = parsed.update_query_dict({"options": options})
    connect_args: dict[str, Any] = {"connect_timeout": connect_timeout}
    if "application_name" not in parsed.query:
        connect_args["application_name"] = application_name
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        poolclass=sa.QueuePool if pool else sa.NullPool,
        # Agent output and state are data, not diagnostics: keep them out of error messages.
        hide_parameters=True,
        json_serializer=compact_json,
        connect_args=connect_args,
        **({"pool_size": 2, "max_overflow": 2} if pool else {}),
    )


@contextmanager
def translate_errors(operation: str, url: sa.URL) -> Iterator[None]:
    """Re-raise driver errors as HistoryError naming the operation (never the password)."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip()
        raise HistoryUnavailableError(
            f"{operation}: database {redact_url(url)} unavailable: {cause}"
        ) from exc
    except sa.exc.DBAPIError as exc:
        cause = str(exc.orig or exc).strip()
        raise HistoryError(f"{operation} failed: {cause}") from exc


# --------------------------------------------------------------------------------------------
# Migrations


def upgrade(url: str, revision: str = "head", *, connect_timeout: int = 10) -> None:
    """Migrate the history schema to ``revision``; safe to run concurrently (advisory lock).

    Tables and Alembic's version table go to the first schema of the connection's search_path.
    """
    from alembic import command  # noqa: PLC0415 - only migrations need Alembic
    from alembic.config import Config  # noqa: PLC0415

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise HistoryError(
            f"history migrations not found at {MIGRATIONS_DIR}: operator/storage/migrations "
            "must be "
            "installed as package data"
        )
    engine = _engine(
        url,
        connect_timeout=connect_timeout,
        statement_timeout_ms=None,
        application_name="nocturne-migrate",
        pool=False,
    )
    lock = sa.text("SELECT pg_advisory_lock(:key)").bindparams(key=_MIGRATION_LOCK_KEY)
    unlock = sa.text("SELECT pg_advisory_unlock(:key)").bindparams(key=_MIGRATION_LOCK_KEY)
    try:
        with (
            translate_errors(f"migrate history to {revision}", engine.url),
            engine.connect() as conn,
        ):
            conn.execute(lock)
            conn.commit()
            try:
                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS_DIR))
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
            finally:
                conn.rollback()
                conn.execute(unlock)
                conn.commit()
        log.info("history schema of %s at %s", redact_url(engine.url), revision)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Repository


CostBy = Literal["day", "week", "month"]


class History:
    """The history repository: short transactions on a small pooled engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        connect_timeout: int = 5,
        statement_timeout_ms: int = 15_000,
        application_name: str = "nocturne",
    ) -> History:
        """A repository on ``url`` (``postgresql+psycopg://``); connects lazily, with pre-ping,
        ``connect_timeout`` seconds to connect and a server-side ``statement_timeout``."""
        engine = _engine(
            url,
            connect_timeout=connect_timeout,
            statement_timeout_ms=statement_timeout_ms,
            application_name=application_name,
            pool=True,
        )
        log.debug("history database %s", redact_url(engine.url))
        return cls(engine)

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _begin(self, operation: str) -> Iterator[sa.Connection]:
        with translate_errors(operation, self.engine.url), self.engine.begin() as conn:
            yield conn

    # ---- run writes (the run API, and the operator's own bookkeeping) -------------------------

    def reserve(
        self, key: ExecutionKey, *, model: str, provider: str, started_at: datetime, caps: Caps
    ) -> GrantRecord:
        """Grant an attempt its budget and record it: RUNNING with ``granted_usd`` when something
        is left, else already final as BUDGET_EXCEEDED with the reason (spend nothing).

        One transaction under a per-schedule-UID advisory lock, so concurrent reservations (any
        replica) see each other: the committed amounts of a schedule UID -- costs of final rows,
        max(grant, cost) of running ones -- never exceed its total or monthly cap, nor those of a
        Job its per-run cap, as long as reported costs stay within grants. A replay with the same
        (job_uid, pod_uid) returns the recorded grant and changes nothing. ``key.attempt`` is
        ignored: attempts are numbered here, in the order they reserve.
        """
        _aware("started_at", started_at)
        if not isinstance(caps, Caps):
            raise TypeError(f"caps: {caps!r} must be a Caps")
        t = _EXECUTIONS
        what = (
            f"reserve the budget of {key.namespace}/{key.schedule_name} job {key.job_name} "
            f"pod {key.pod_uid}"
        )
        lock = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:uid, :seed))").bindparams(
            uid=key.schedule_uid, seed=_BUDGET_LOCK_SEED
        )
        with self._begin(what) as conn:
            # Read committed: every statement after the lock sees what earlier holders committed.
            conn.execute(lock)
            existing = self._attempt_row(conn, key)
            if existing is not None:
                return self._replayed(conn, key, existing, what)
            in_job = t.c.job_uid == key.job_uid
            job = conn.execute(
                sa.select(
                    sa.func.count(),
                    _committed_sum(),
                    _cost_sum(),
                    sa.func.coalesce(sa.func.bool_or(t.c.schedule_uid != key.schedule_uid), False),
                ).where(in_job)
            ).one()
            attempts, job_committed, job_spent, foreign = job
            if foreign:
                raise HistoryError(
                    f"{what}: job UID {key.job_uid} already has attempts of another schedule UID "
                    f"than {key.schedule_uid}"
                )
            refusal, limit = self._decide(conn, key, caps, _Held(job_committed, job_spent))
            values: dict[str, Any] = {
                "namespace": key.namespace,
                "schedule_name": key.schedule_name,
                "schedule_uid": key.schedule_uid,
                "job_name": key.job_name,
                "job_uid": key.job_uid,
                "pod_uid": key.pod_uid,
                "attempt": int(attempts),
                "manual_request": key.manual_request,
                "status": ExecutionStatus.RUNNING.value,
                "started_at": started_at,
                "model": model,
                "provider": provider,
                "granted_usd": limit,
            }
            if refusal is not None:
                reason, message = refusal
                values |= {
                    "status": ExecutionStatus.BUDGET_EXCEEDED.value,
                    "completed_at": started_at,
                    "error": clean_text(message, ERROR_LIMIT_BYTES),
                    "metadata": {"refused": reason},
                }
            insert = (
                pg.insert(t)
                .values(values)
                .on_conflict_do_nothing(constraint="uq_schedule_executions_job_uid_pod_uid")
                .returning(t.c.id)
            )
            new_id = conn.execute(insert).scalar_one_or_none()
            if new_id is None:  # a racing reservation under another schedule UID's lock
                row = self._attempt_row(conn, key)
                if row is None:  # rows are never deleted; this would be a bug
                    raise HistoryError(f"{what}: the conflicting attempt vanished")
                return self._replayed(conn, key, row, what)
        if refusal is not None:
            log.info("%s: refused, %s", what, refusal[1])
        return GrantRecord(
            execution_id=int(new_id),
            attempt=int(attempts),
            limit=limit,
            spent_before=Decimal(job_committed),
            refused=refusal[0] if refusal else None,
            message=refusal[1] if refusal else None,
            replay=False,
        )

    @staticmethod
    def _decide(
        conn: sa.Connection, key: ExecutionKey, caps: Caps, job: _Held
    ) -> tuple[tuple[NoGrantReason, str] | None, Decimal]:
        """What an attempt may spend under ``caps``, and why not when nothing is left."""
        t = _EXECUTIONS
        columns = [_committed_sum(), _cost_sum()]
        # Caps makes month_start present whenever monthly is.
        month_start = caps.month_start if caps.monthly is not None else None
        if month_start is not None:
            since = t.c.started_at >= month_start
            columns += [_committed_sum(since), _cost_sum(since)]
        # Only this UID's rows: a re-created schedule of the same name starts clean.
        committed, spent, *month = conn.execute(
            sa.select(*columns).where(t.c.schedule_uid == key.schedule_uid)
        ).one()
        schedule = _Held(Decimal(committed), Decimal(spent))
        # In precedence order: the first cap with nothing left names the refusal.
        left: list[tuple[NoGrantReason, Decimal, str]] = [
            (
                "BudgetExhausted",
                caps.per_run - job.committed,
                job.describe(
                    "maxPerRunUSD", caps.per_run, f"the earlier attempts of Job {key.job_name}"
                ),
            )
        ]
        if caps.total is not None:
            left.append(
                (
                    "TotalBudgetReached",
                    caps.total - schedule.committed,
                    schedule.describe("maxTotalUSD", caps.total, "running Jobs"),
                )
            )
        if caps.monthly is not None and month_start is not None:
            this_month = _Held(Decimal(month[0]), Decimal(month[1]))
            left.append(
                (
                    "MonthlyBudgetReached",
                    caps.monthly - this_month.committed,
                    this_month.describe(
                        "maxMonthlyUSD",
                        caps.monthly,
                        "running Jobs",
                        f" for the month from {month_start.isoformat()}",
                    ),
                )
            )
        limit = _floor_usd(min(MAX_USD, max(Decimal(0), min(amount for _, amount, _ in left))))
        if limit > 0:
            return None, limit
        reason, _, message = next(item for item in left if _floor_usd(item[1]) <= 0)
        return (reason, message), Decimal(0)

    @staticmethod
    def _attempt_row(conn: sa.Connection, key: ExecutionKey) -> sa.Row[Any] | None:
        t = _EXECUTIONS
        return conn.execute(
            sa.select(*_execution_columns(False)).where(
                t.c.job_uid == key.job_uid, t.c.pod_uid == key.pod_uid
            )
        ).first()

    @staticmethod
    def _replayed(
        conn: sa.Connection, key: ExecutionKey, row: sa.Row[Any], what: str
    ) -> GrantRecord:
        """The grant recorded for an attempt that had reserved before."""
        if row.schedule_uid != key.schedule_uid:
            raise HistoryError(
                f"{what}: job UID {key.job_uid} pod UID {key.pod_uid} already belongs to "
                f"execution {row.id} of schedule UID {row.schedule_uid}"
            )
        t = _EXECUTIONS
        before = conn.execute(
            sa.select(_committed_sum()).where(t.c.job_uid == key.job_uid, t.c.id < row.id)
        ).scalar_one()
        reason = (row.metadata or {}).get("refused")
        refused = (
            cast(NoGrantReason, reason)
            if row.status == ExecutionStatus.BUDGET_EXCEEDED.value and reason in _NO_GRANT_REASONS
            else None
        )
        return GrantRecord(
            execution_id=int(row.id),
            attempt=int(row.attempt),
            # A row without a grant (written by start()) was granted nothing.
            limit=Decimal(0) if row.granted_usd is None else Decimal(row.granted_usd),
            spent_before=Decimal(before),
            refused=refused,
            message=row.error if refused else None,
            replay=True,
        )

    def start(self, key: ExecutionKey, *, model: str, provider: str, started_at: datetime) -> int:
        """Insert the attempt as RUNNING without a grant and return its id; a replay with the
        same (job_uid, pod_uid) returns the existing row's id and changes nothing. For attempts
        that never reserved (the operator records what a finished Job left); runs get their
        budget from ``reserve()``."""
        _aware("started_at", started_at)
        t = _EXECUTIONS
        insert = (
            pg.insert(t)
            .values(
                namespace=key.namespace,
                schedule_name=key.schedule_name,
                schedule_uid=key.schedule_uid,
                job_name=key.job_name,
                job_uid=key.job_uid,
                pod_uid=key.pod_uid,
                attempt=key.attempt,
                manual_request=key.manual_request,
                status=ExecutionStatus.RUNNING.value,
                started_at=started_at,
                model=model,
                provider=provider,
            )
            .on_conflict_do_nothing(constraint="uq_schedule_executions_job_uid_pod_uid")
            .returning(t.c.id)
        )
        what = f"start execution of {key.namespace}/{key.schedule_name} job {key.job_name}"
        with self._begin(what) as conn:
            new_id = conn.execute(insert).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            row = conn.execute(
                sa.select(t.c.id, t.c.namespace, t.c.schedule_name).where(
                    t.c.job_uid == key.job_uid, t.c.pod_uid == key.pod_uid
                )
            ).one()
        if (row.namespace, row.schedule_name) != (key.namespace, key.schedule_name):
            raise HistoryError(
                f"{what}: job UID {key.job_uid} pod UID {key.pod_uid} already belongs to "
                f"execution {row.id} of {row.namespace}/{row.schedule_name}"
            )
        return int(row.id)

    def record_progress(
        self, execution_id: int, *, cost_usd: Decimal, input_tokens: int, output_tokens: int
    ) -> None:
        """Raise a RUNNING execution's cost and token counts to the given totals (never lower
        them); a no-op once the execution is final.

        A cost above the attempt's grant is still recorded (it was spent), flagged
        ``metadata.overrun`` and logged as a warning: the schedule's later grants shrink by it.
        """
        cost = _usd("cost_usd", cost_usd)
        tokens_in = _tokens("input_tokens", input_tokens)
        tokens_out = _tokens("output_tokens", output_tokens)
        t = _EXECUTIONS
        raised = sa.func.greatest(t.c.cost_usd, cost)
        update = (
            sa.update(t)
            .where(t.c.id == execution_id, t.c.status == ExecutionStatus.RUNNING.value)
            .values(
                cost_usd=raised,
                input_tokens=sa.func.greatest(t.c.input_tokens, tokens_in),
                output_tokens=sa.func.greatest(t.c.output_tokens, tokens_out),
                updated_at=sa.func.now(),
                metadata=sa.case(
                    (raised > t.c.granted_usd, t.c["metadata"].op("||")(_OVERRUN)),
                    else_=t.c["metadata"],
                ),
            )
            .returning(t.c.id, t.c.cost_usd, t.c.granted_usd)
        )
        what = f"record progress of execution {execution_id}"
        with self._begin(what) as conn:
            row = conn.execute(update).first()
            if row is None and not self._exists(conn, execution_id):
                raise ExecutionNotFoundError(f"{what}: no such execution")
        if row is not None:
            _warn_overrun(what, row.cost_usd, row.granted_usd)

    def finish(
        self,
        execution_id: int,
        *,
        status: ExecutionStatus | str,
        completed_at: datetime,
        cost_usd: Decimal,
        input_tokens: int,
        output_tokens: int,
        output: str | None = None,
        error: str | None = None,
        alert: bool = False,
        alert_reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ExecutionStatus:
        """Record the final status and return the status now stored.

        The first final status wins: a replay, or a later finish by someone else (the reaper),
        keeps status, output and error, but cost and tokens still only ever rise. Output and
        error are truncated to OUTPUT_LIMIT_BYTES / ERROR_LIMIT_BYTES. A cost above the grant
        is recorded as reported, flagged ``metadata.overrun`` and logged (see record_progress).
        """
        final = ExecutionStatus(status)
        if final is ExecutionStatus.RUNNING:
            raise ValueError("finish(): status RUNNING is not a final status")
        _aware("completed_at", completed_at)
        cost = _usd("cost_usd", cost_usd)
        tokens_in = _tokens("input_tokens", input_tokens)
        tokens_out = _tokens("output_tokens", output_tokens)
        meta = dict(metadata or {})
        json_document("finish(): metadata", meta)
        t = _EXECUTIONS
        what = f"finish execution {execution_id} as {final.value}"
        with self._begin(what) as conn:
            row = conn.execute(
                sa.select(t.c.status, t.c.cost_usd, t.c.granted_usd)
                .where(t.c.id == execution_id)
                .with_for_update()
            ).first()
            if row is None:
                raise ExecutionNotFoundError(f"{what}: no such execution")
            current = row.status
            overrun = row.granted_usd is not None and max(row.cost_usd, cost) > row.granted_usd
            if overrun and (current == ExecutionStatus.RUNNING or cost > row.cost_usd):
                _warn_overrun(what, max(row.cost_usd, cost), row.granted_usd)
            values: dict[str, Any] = {
                "cost_usd": sa.func.greatest(t.c.cost_usd, cost),
                "input_tokens": sa.func.greatest(t.c.input_tokens, tokens_in),
                "output_tokens": sa.func.greatest(t.c.output_tokens, tokens_out),
                "updated_at": sa.func.now(),
            }
            if current == ExecutionStatus.RUNNING:
                values |= {
                    "status": final.value,
                    "completed_at": completed_at,
                    "output": clean_text(output, OUTPUT_LIMIT_BYTES),
                    "error": clean_text(error, ERROR_LIMIT_BYTES),
                    "alert": bool(alert),
                    "alert_reason": clean_text(alert_reason, ERROR_LIMIT_BYTES),
                    "metadata": meta | {"overrun": True} if overrun else meta,
                }
                conn.execute(sa.update(t).where(t.c.id == execution_id).values(values))
                return final
            conn.execute(
                sa.update(t)
                .where(
                    t.c.id == execution_id,
                    sa.or_(
                        t.c.cost_usd < cost,
                        t.c.input_tokens < tokens_in,
                        t.c.output_tokens < tokens_out,
                    ),
                )
                .values(
                    values | {"metadata": t.c["metadata"].op("||")(_OVERRUN)} if overrun else values
                )
            )
            return ExecutionStatus(current)

    def spent_for_job(self, job_uid: str, *, exclude_pod_uid: str | None = None) -> Decimal:
        """Recorded cost of every attempt (pod) of a Job (grants not counted; ``reserve()``
        counts those); ``exclude_pod_uid`` leaves out one attempt."""
        t = _EXECUTIONS
        query = sa.select(_cost_sum()).where(t.c.job_uid == job_uid)
        if exclude_pod_uid is not None:
            query = query.where(t.c.pod_uid != exclude_pod_uid)
        with self._begin(f"read spent cost of job {job_uid}") as conn:
            return Decimal(conn.execute(query).scalar_one())

    def save_state(
        self,
        namespace: str,
        schedule_name: str,
        state_key: str = "",
        *,
        state: Any,
        output: str | None,
        execution_id: int | None,
    ) -> None:
        """Replace the agent state of a schedule (and state key) for its next run.

        Raises StateTooLargeError over STATE_LIMIT_BYTES / STATE_OUTPUT_LIMIT_BYTES.
        """
        what = f"agent state of {namespace}/{schedule_name} (stateKey {state_key!r})"
        validate_state(state, output, what=what)
        t = _STATE
        insert = pg.insert(t).values(
            namespace=namespace,
            schedule_name=schedule_name,
            state_key=state_key,
            state=state,
            output=output,
            execution_id=execution_id,
        )
        upsert = insert.on_conflict_do_update(
            constraint="pk_agent_state",
            set_={
                "state": insert.excluded.state,
                "output": insert.excluded.output,
                "execution_id": insert.excluded.execution_id,
                "updated_at": sa.func.now(),
            },
        )
        with self._begin(f"save {what}") as conn:
            conn.execute(upsert)

    def load_state(
        self, namespace: str, schedule_name: str, state_key: str = ""
    ) -> SavedState | None:
        """The state saved for a schedule (and state key), or None if none was saved."""
        t = _STATE
        query = sa.select(t.c.state, t.c.output, t.c.execution_id, t.c.updated_at).where(
            t.c.namespace == namespace,
            t.c.schedule_name == schedule_name,
            t.c.state_key == state_key,
        )
        what = f"load agent state of {namespace}/{schedule_name} (stateKey {state_key!r})"
        with self._begin(what) as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return SavedState(row.state, row.output, row.execution_id, row.updated_at)

    # ---- reads for the operator and CLI -----------------------------------------------------

    def get(self, execution_id: int, *, include_output: bool = True) -> ExecutionRecord | None:
        """One execution by id, or None."""
        query = sa.select(*_execution_columns(include_output)).where(
            _EXECUTIONS.c.id == execution_id
        )
        with self._begin(f"read execution {execution_id}") as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)

    def for_job(self, job_uid: str, *, include_output: bool = False) -> list[ExecutionRecord]:
        """Every attempt of a Job, oldest first."""
        t = _EXECUTIONS
        query = (
            sa.select(*_execution_columns(include_output))
            .where(t.c.job_uid == job_uid)
            .order_by(t.c.started_at, t.c.id)
        )
        with self._begin(f"read executions of job {job_uid}") as conn:
            return [_record(row) for row in conn.execute(query)]

    def runs(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: ExecutionStatus | str | Collection[ExecutionStatus | str] | None = None,
        limit: int = 50,
        before_id: int | None = None,
        include_output: bool = False,
    ) -> list[ExecutionRecord]:
        """Runs of a schedule started in [since, until), newest first, at most ``limit``.

        Keyset pagination: pass the last id of a page as ``before_id`` for the next page.
        """
        _check_page_limit(limit)
        t = _EXECUTIONS
        what = f"list runs of {namespace}/{schedule_name}"
        query = (
            sa.select(*_execution_columns(include_output))
            .where(*self._schedule_range(namespace, schedule_name, since, until))
            .order_by(t.c.started_at.desc(), t.c.id.desc())
            .limit(limit)
        )
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            query = query.where(t.c.status.in_([ExecutionStatus(s).value for s in wanted]))
        with self._begin(what) as conn:
            if before_id is not None:
                cursor = conn.execute(
                    sa.select(t.c.started_at, t.c.id).where(
                        t.c.id == before_id,
                        t.c.namespace == namespace,
                        t.c.schedule_name == schedule_name,
                    )
                ).first()
                if cursor is None:
                    raise ValueError(
                        f"before_id: {before_id} is not a run of {namespace}/{schedule_name}"
                    )
                query = query.where(
                    sa.tuple_(t.c.started_at, t.c.id) < sa.tuple_(cursor.started_at, cursor.id)
                )
            return [_record(row) for row in conn.execute(query)]

    def cost(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        by: CostBy = "day",
        tz: str = "UTC",
    ) -> list[CostPeriod]:
        """Cost of a schedule's runs started in [since, until), summed per calendar day, week
        (from Monday) or month in time zone ``tz``; periods without runs are left out."""
        if by not in ("day", "week", "month"):
            raise ValueError(f"by: {by!r} must be one of day, week, month")
        zone = _zone(tz)
        t = _EXECUTIONS
        period = sa.func.date_trunc(
            sa.literal(by, sa.Text),
            t.c.started_at,
            sa.literal(tz, sa.Text),
            type_=sa.DateTime(timezone=True),
        ).label("period_start")
        inner = (
            sa.select(period, t.c.cost_usd)
            .where(*self._schedule_range(namespace, schedule_name, since, until))
            .subquery()
        )
        query = (
            sa.select(inner.c.period_start, sa.func.sum(inner.c.cost_usd))
            .group_by(inner.c.period_start)
            .order_by(inner.c.period_start)
        )
        with self._begin(f"sum cost of {namespace}/{schedule_name} by {by} in {tz}") as conn:
            rows = conn.execute(query).all()
        return [CostPeriod(start.astimezone(zone), Decimal(total)) for start, total in rows]

    def run_stats(
        self,
        namespace: str,
        schedule_name: str,
        *,
        schedule_uid: str | None = None,
        failures_since: datetime | None = None,
        month_start: datetime | None = None,
        streak_limit: int = 100,
    ) -> RunStats:
        """Totals and the current failure streak, derived from the rows (the source of truth, so
        replays and operator restarts never double-count). Failures of Jobs started before
        ``failures_since`` (a resume) do not count towards the streak. With ``month_start``,
        also the cost of runs started since then. With ``schedule_uid``, only that incarnation's
        rows count (a re-created schedule starts clean); else every row of the name."""
        t = _EXECUTIONS
        where = self._schedule_range(namespace, schedule_name, None, None, schedule_uid)
        newest_first = sa.func.row_number().over(
            partition_by=t.c.job_uid,
            order_by=(t.c.attempt.desc(), t.c.started_at.desc(), t.c.id.desc()),
        )
        ranked = (
            sa.select(*_execution_columns(include_output=False), newest_first.label("rank"))
            .where(*where)
            .subquery()
        )
        last_attempts = (
            sa.select(*(c for c in ranked.c if c.name != "rank"))
            .where(ranked.c.rank == 1)
            .subquery()
        )
        outcome = last_attempts.c.status
        counts = sa.select(
            sa.func.count().filter(outcome == ExecutionStatus.SUCCEEDED.value).label("succeeded"),
            sa.func.count().filter(outcome.in_([s.value for s in FAILED_OUTCOMES])).label("failed"),
        ).subquery()
        month_cost = (
            _cost_sum(t.c.started_at >= _aware("month_start", month_start))
            if month_start is not None
            else sa.null()
        )
        # Every attempt's cost and the latest success, in the same statement as the counts.
        totals = (
            sa.select(
                _cost_sum().label("total_cost"),
                sa.func.max(t.c.started_at)
                .filter(t.c.status == ExecutionStatus.SUCCEEDED.value)
                .label("last_success_at"),
                month_cost.label("month_cost"),
            )
            .where(*where)
            .subquery()
        )
        recent = (
            sa.select(last_attempts)
            .where(outcome != ExecutionStatus.RUNNING.value)
            .order_by(last_attempts.c.started_at.desc(), last_attempts.c.id.desc())
            .limit(streak_limit)
        )
        # Two one-row subqueries: joined on TRUE, not on a forgotten condition.
        both = sa.select(counts, totals).select_from(counts.join(totals, sa.true()))
        with self._begin(f"read run statistics of {namespace}/{schedule_name}") as conn:
            summary = conn.execute(both).one()
            rows = [_record(row) for row in conn.execute(recent)]
        streak = 0
        for row in rows:
            if failures_since is not None and row.started_at < failures_since:
                break
            if row.status is ExecutionStatus.SUCCEEDED:
                break
            if row.status in FAILED_OUTCOMES:
                streak += 1
        return RunStats(
            Decimal(summary.total_cost),
            int(summary.succeeded),
            int(summary.failed),
            streak,
            rows[0] if rows else None,
            last_success_at=summary.last_success_at,
            month_cost=None if summary.month_cost is None else Decimal(summary.month_cost),
        )

    def total_cost(
        self,
        namespace: str,
        schedule_name: str,
        *,
        schedule_uid: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Decimal:
        """Total cost of a schedule's runs started in [since, until); with ``schedule_uid``,
        of that incarnation's runs only."""
        query = sa.select(_cost_sum()).where(
            *self._schedule_range(namespace, schedule_name, since, until, schedule_uid)
        )
        with self._begin(f"sum cost of {namespace}/{schedule_name}") as conn:
            return Decimal(conn.execute(query).scalar_one())

    def running(self, schedule_uid: str, *, limit: int = 100) -> list[ExecutionRecord]:
        """The RUNNING attempts of a schedule UID (in flight, holding their grants), oldest
        first."""
        _check_page_limit(limit)
        t = _EXECUTIONS
        query = (
            sa.select(*_execution_columns(False))
            # A literal, not a parameter: the planner must see it to use the partial index.
            .where(
                t.c.schedule_uid == schedule_uid,
                t.c.status == sa.literal_column("'RUNNING'"),
            )
            .order_by(t.c.started_at, t.c.id)
            .limit(limit)
        )
        with self._begin(f"list running executions of schedule UID {schedule_uid}") as conn:
            return [_record(row) for row in conn.execute(query)]

    def stuck_running(self, older_than: timedelta, *, limit: int = 500) -> list[ExecutionRecord]:
        """RUNNING executions started more than ``older_than`` ago, oldest first (for the reaper,
        which checks whether their Job or pod still exists)."""
        cutoff = datetime.now(UTC) - older_than
        t = _EXECUTIONS
        query = (
            sa.select(*_execution_columns(False))
            # A literal, not a parameter: the planner must see it to use the partial index.
            .where(t.c.status == sa.literal_column("'RUNNING'"), t.c.started_at < cutoff)
            .order_by(t.c.started_at)
            .limit(limit)
        )
        with self._begin("list stuck RUNNING executions") as conn:
            return [_record(row) for row in conn.execute(query)]

    def record_event(
        self,
        namespace: str,
        schedule_name: str,
        kind: EventKind | str,
        *,
        reason: str | None = None,
        actor: str | None = None,
        schedule_uid: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Append an audit event and return its id; ``kind`` is lower_snake_case."""
        kind = str(kind)
        if not _EVENT_KIND_RE.match(kind):
            raise ValueError(f"kind: {kind!r} must be lower_snake_case (e.g. auto_paused)")
        if at is not None:
            _aware("at", at)
        payload = dict(details or {})
        json_document("record_event(): details", payload)
        values: dict[str, Any] = {
            "namespace": namespace,
            "schedule_name": schedule_name,
            "schedule_uid": schedule_uid,
            "kind": kind,
            "reason": clean_text(reason, ERROR_LIMIT_BYTES),
            "actor": actor,
            "details": payload,
        }
        if at is not None:
            values["at"] = at
        insert = sa.insert(_EVENTS).values(values).returning(_EVENTS.c.id)
        with self._begin(f"record {kind} event of {namespace}/{schedule_name}") as conn:
            return int(conn.execute(insert).scalar_one())

    def events(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Audit events of a schedule in [since, until), newest first."""
        _check_page_limit(limit)
        t = _EVENTS
        query = (
            sa.select(t)
            .where(t.c.namespace == namespace, t.c.schedule_name == schedule_name)
            .order_by(t.c.at.desc(), t.c.id.desc())
            .limit(limit)
        )
        if since is not None:
            query = query.where(t.c.at >= _aware("since", since))
        if until is not None:
            query = query.where(t.c.at < _aware("until", until))
        with self._begin(f"list events of {namespace}/{schedule_name}") as conn:
            return [EventRecord(**row._mapping) for row in conn.execute(query)]

    # ---- internals ----------------------------------------------------------------------------

    @staticmethod
    def _schedule_range(
        namespace: str,
        schedule_name: str,
        since: datetime | None,
        until: datetime | None,
        schedule_uid: str | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        t = _EXECUTIONS
        # A UID names one incarnation on its own (and leads its index); names are for people.
        where = (
            [t.c.namespace == namespace, t.c.schedule_name == schedule_name]
            if schedule_uid is None
            else [t.c.schedule_uid == schedule_uid]
        )
        if since is not None:
            where.append(t.c.started_at >= _aware("since", since))
        if until is not None:
            where.append(t.c.started_at < _aware("until", until))
        return where

    @staticmethod
    def _exists(conn: sa.Connection, execution_id: int) -> bool:
        query = sa.select(sa.literal(1)).where(_EXECUTIONS.c.id == execution_id)
        return conn.execute(query).first() is not None
