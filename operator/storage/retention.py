"""Retention: old finished runs and audit rows are deleted in small batches (``purge_runs``,
``purge_events``; the operator's sweep calls them), and ``table_stats`` tells how large the
tables are (``nocturne db stats``).

A purged run's cost, tokens and outcome are added to its schedule UID's row of
``schedule_purged_totals`` in the transaction that deletes it, so every lifetime sum -- the
maxTotalUSD check of ``reserve``, ``total_cost``, the totals and run counts of ``run_stats`` --
adds what was purged and never drops. What the purge keeps, so that nothing else changes:

- RUNNING rows; and a Job's attempts go together, once every one of them is due, so a Job is
  counted once, by its last attempt, like ``run_stats`` counts it;
- a schedule's runs since its latest success, that success included: the failure streak, the
  silent-stop alarm's last success and ``last_run`` read them. A schedule that never succeeded
  keeps every run (auto-pause bounds how many);
- this month and the month before (the settings' minimum of 62 days): the monthly budget and
  ``cost`` by month read them.

Reads of a range (``runs``, ``cost`` per period) lose what was purged: that is the point.

A schedule's ``created`` audit row goes with its ``deleted`` row, not before: the operator
reports a live schedule's creation again after a restart, and the first row must stay first.

One purge at a time (a transaction-level advisory lock: a second caller deletes nothing and
returns at once); rows another transaction holds are skipped until the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import RunOutcome
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.queries import FAILED_OUTCOMES
from nocturne_operator.storage.schema import (
    EVENTS,
    EXECUTIONS,
    PURGEABLE_EVENTS_SQL,
    PURGED_TOTALS,
    EventKind,
)
from nocturne_operator.storage.values import aware

__all__ = ["Retention", "TableStats"]

# pg_try_advisory_xact_lock key of a purge ("noct" + "purg"): one purge batch at a time.
_PURGE_LOCK_KEY = 0x6E6F6374_70757267
# Literals, not parameters: the planner must see them to use the partial indexes.
_RUNNING: sa.ColumnElement[str] = sa.literal_column("'RUNNING'", sa.Text)
_SUCCEEDED: sa.ColumnElement[str] = sa.literal_column("'SUCCEEDED'", sa.Text)
# The column that dates a table's rows, for "oldest row" (tables not listed have none).
_DATED_BY = {
    "agent_state": "updated_at",
    "notifications": "created_at",
    "schedule_events": "at",
    "schedule_executions": "started_at",
    "schedule_purged_totals": "first_started_at",
}


@dataclass(frozen=True)
class TableStats:
    """One table of the history schema, as ``nocturne db stats`` shows it."""

    name: str
    rows: int
    rows_estimated: bool
    """``rows`` is PostgreSQL's estimate (``pg_class.reltuples``, as of the last VACUUM or
    ANALYZE); False: counted, for a table never analysed."""
    total_bytes: int
    """``pg_total_relation_size``: the table, its indexes and TOAST."""
    oldest: datetime | None
    """The oldest row's date (start of a run, time of an event, ...); None when empty or the
    table has no date column."""


def _lock(conn: sa.Connection) -> bool:
    """Take the purge lock for this transaction; False when another purge holds it."""
    query = sa.select(sa.func.pg_try_advisory_xact_lock(sa.literal(_PURGE_LOCK_KEY, sa.BigInteger)))
    return bool(conn.execute(query).scalar_one())


def _check_batch(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise ValueError(f"limit: {limit!r} must be an integer from 1 to 10000")


class _Carried:
    """What one batch purged of one schedule UID."""

    def __init__(self, row: Any) -> None:
        self.namespace: str = row.namespace
        self.schedule_name: str = row.schedule_name
        self.cost = Decimal(0)
        self.input_tokens = 0
        self.output_tokens = 0
        self.attempts = 0
        self.succeeded = 0
        self.failed = 0
        self.first: datetime = row.started_at
        self.last: datetime = row.started_at

    def add(self, row: Any) -> None:
        self.cost += row.cost_usd
        self.input_tokens += row.input_tokens
        self.output_tokens += row.output_tokens
        self.attempts += 1
        self.first = min(self.first, row.started_at)
        self.last = max(self.last, row.started_at)

    def count_run(self, outcome: str) -> None:
        if outcome == RunOutcome.SUCCEEDED:
            self.succeeded += 1
        elif outcome in FAILED_OUTCOMES:
            self.failed += 1


def _carry(rows: Sequence[Any]) -> dict[str, _Carried]:
    """Deleted rows summed per schedule UID; each Job counts once, as its last attempt ended
    (the order of ``run_stats``: attempt, then start, then id)."""
    carried: dict[str, _Carried] = {}
    last_of_job: dict[str, Any] = {}
    for row in rows:
        carried.setdefault(row.schedule_uid, _Carried(row)).add(row)
        seen = last_of_job.get(row.job_uid)
        if seen is None or (row.attempt, row.started_at, row.id) > (
            seen.attempt,
            seen.started_at,
            seen.id,
        ):
            last_of_job[row.job_uid] = row
    for row in last_of_job.values():
        carried[row.schedule_uid].count_run(row.status)
    return carried


def _add_to_totals(conn: sa.Connection, carried: dict[str, _Carried]) -> None:
    p = PURGED_TOTALS
    insert = pg.insert(p).values(
        [
            {
                "schedule_uid": uid,
                "namespace": c.namespace,
                "schedule_name": c.schedule_name,
                "cost_usd": c.cost,
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "attempts": c.attempts,
                "succeeded": c.succeeded,
                "failed": c.failed,
                "first_started_at": c.first,
                "last_started_at": c.last,
            }
            for uid, c in sorted(carried.items())
        ]
    )
    new = insert.excluded
    summed = ("cost_usd", "input_tokens", "output_tokens", "attempts", "succeeded", "failed")
    conn.execute(
        insert.on_conflict_do_update(
            constraint="pk_schedule_purged_totals",
            set_={
                **{name: p.c[name] + new[name] for name in summed},
                "first_started_at": sa.func.least(p.c.first_started_at, new.first_started_at),
                "last_started_at": sa.func.greatest(p.c.last_started_at, new.last_started_at),
                "updated_at": sa.func.now(),
            },
        )
    )


class Retention(Repository):
    """Purges of ``schedule_executions`` and ``schedule_events``, and the tables' sizes."""

    def purge_runs(self, before: datetime, *, limit: int = 500) -> int:
        """Delete one batch of runs that ended before ``before`` -- at most ``limit`` attempts,
        those that ended first, each with the rest of its Job -- and add them to their
        schedules' purged totals in the same transaction; return the rows deleted (0 when
        nothing is due, or another purge is running). See the module for what is kept."""
        aware("before", before)
        _check_batch(limit)
        t = EXECUTIONS
        sibling = EXECUTIONS.alias("sibling")
        success = EXECUTIONS.alias("success")
        # Runs from the schedule's latest success on are kept (NULL: it never succeeded).
        kept_from = (
            sa.select(sa.func.max(success.c.started_at).label("at"))
            .where(success.c.schedule_uid == t.c.schedule_uid, success.c.status == _SUCCEEDED)
            .lateral("kept_from")
        )
        picked = (
            sa.select(t.c.job_uid)
            .select_from(t.join(kept_from, sa.true()))
            .where(
                t.c.completed_at < before,  # final (RUNNING rows have none) and due
                t.c.started_at < kept_from.c.at,
                # Every attempt of the Job is due, none runs: the Job goes as a whole.
                ~sa.exists().where(
                    sibling.c.job_uid == t.c.job_uid,
                    sa.or_(
                        sibling.c.status == _RUNNING,
                        sibling.c.completed_at >= before,
                        sibling.c.started_at >= kept_from.c.at,
                    ),
                ),
            )
            .order_by(t.c.completed_at)
            .limit(limit)
            .with_for_update(of=t, skip_locked=True)
        )
        with self._begin(f"purge runs that ended before {before.isoformat()}") as conn:
            if not _lock(conn):
                return 0
            jobs = sorted(set(conn.execute(picked).scalars()))
            if not jobs:
                return 0
            deleted = conn.execute(
                sa.delete(t)
                .where(t.c.job_uid.in_(jobs), t.c.completed_at < before)
                .returning(
                    t.c.id,
                    t.c.schedule_uid,
                    t.c.namespace,
                    t.c.schedule_name,
                    t.c.job_uid,
                    t.c.attempt,
                    t.c.status,
                    t.c.started_at,
                    t.c.cost_usd,
                    t.c.input_tokens,
                    t.c.output_tokens,
                )
            ).all()
            _add_to_totals(conn, _carry(deleted))
            return len(deleted)

    def purge_events(self, before: datetime, *, limit: int = 500) -> int:
        """Delete one batch of audit rows dated before ``before`` (at most ``limit``, oldest
        first; a schedule's ``created`` row goes with its ``deleted`` row, beyond the limit)
        and return how many (0 when nothing is due, or another purge is running)."""
        aware("before", before)
        _check_batch(limit)
        e = EVENTS
        picked = (
            sa.select(e.c.id, e.c.kind, e.c.schedule_uid)
            # The partial index's predicate, as written there: the planner must see it.
            .where(e.c.at < before, sa.text(PURGEABLE_EVENTS_SQL))
            .order_by(e.c.at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._begin(f"purge audit events before {before.isoformat()}") as conn:
            if not _lock(conn):
                return 0
            rows = conn.execute(picked).all()
            if not rows:
                return 0
            # Schedules whose deletion goes now: their creation goes with it.
            gone = sorted({r.schedule_uid for r in rows if r.kind == EventKind.DELETED} - {None})
            purge = sa.delete(e).where(
                sa.or_(
                    e.c.id.in_([r.id for r in rows]),
                    sa.and_(e.c.kind == EventKind.CREATED.value, e.c.schedule_uid.in_(gone)),
                )
            )
            return int(conn.execute(purge).rowcount)

    def table_stats(self) -> list[TableStats]:
        """Each table of the history schema (the first schema on the search path): rows (an
        estimate, counted where PostgreSQL has none), total size and oldest row, by name."""
        tables = sa.text(
            """
            SELECT c.relname AS name, c.reltuples AS estimate,
                   pg_total_relation_size(c.oid) AS total_bytes
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
              AND c.relname <> 'alembic_version'
            ORDER BY c.relname
            """
        )
        stats: list[TableStats] = []
        with self._begin("read the sizes of the history tables") as conn:
            quote = conn.dialect.identifier_preparer.quote
            for row in conn.execute(tables).all():
                name = str(row.name)
                rows, estimated = int(row.estimate), True
                if rows < 0:  # never vacuumed or analysed: PostgreSQL does not know
                    count = sa.text(f"SELECT count(*) FROM {quote(name)}")  # noqa: S608 - catalog name, quoted
                    rows, estimated = int(conn.execute(count).scalar_one()), False
                oldest = None
                if name in _DATED_BY:
                    first = sa.text(f"SELECT min({quote(_DATED_BY[name])}) FROM {quote(name)}")  # noqa: S608 - ours, quoted
                    oldest = conn.execute(first).scalar_one()
                stats.append(TableStats(name, rows, estimated, int(row.total_bytes), oldest))
        return stats
