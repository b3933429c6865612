"""Reads of run records, for the operator (status, budgets, the reaper) and the CLI: single
runs, a schedule's runs page by page, cost per calendar period, run statistics and the RUNNING
attempts. Everything is derived from the rows, the source of truth, so replays and operator
restarts never double-count. Also the monthly budget's period (``month_start``).

Lifetime sums -- ``total_cost`` without a range, the totals and run counts of ``run_stats`` --
add what the retention purge took from the rows (``schedule_purged_totals``, see ``retention``),
read in the same snapshot as the rows, so a purge committing meanwhile is counted once.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.schema import EXECUTIONS, PURGED_TOTALS
from nocturne_operator.storage.values import aware, check_page_limit

__all__ = [
    "FAILED_OUTCOMES",
    "CostBy",
    "CostPeriod",
    "ExecutionRecord",
    "RunReads",
    "RunStats",
    "month_start",
    "next_month_start",
    "purged_cost",
]


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
    status: RunOutcome
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
    # Drawn again at every write of the row (0009): the agentruns API's resourceVersion.
    revision: int = 0


@dataclass(frozen=True)
class RunStats:
    """A schedule's runs as people count them: one run per Job, whose outcome is its last
    attempt's. ``last_run`` is the latest finished Job's last attempt. ``total_cost``,
    ``succeeded`` and ``failed`` include the purged runs."""

    total_cost: Decimal
    succeeded: int
    failed: int
    consecutive_failures: int
    last_run: ExecutionRecord | None
    # Start of the latest successful attempt (the silent-stop alarm's reference).
    last_success_at: datetime | None = None
    # Cost of runs started since ``month_start`` (the monthly budget); None when not asked.
    month_cost: Decimal | None = None

    @classmethod
    def before_any_run(cls, query: StatsQuery) -> RunStats:
        """What ``run_stats`` answers ``query`` for a schedule that has not run yet."""
        month_cost = None if query.month_start is None else Decimal(0)
        return cls(Decimal(0), 0, 0, 0, None, month_cost=month_cost)


# Outcomes that count as a failed run; CANCELLED (deletion, eviction) does not.
FAILED_OUTCOMES = frozenset({RunOutcome.FAILED, RunOutcome.BUDGET_EXCEEDED, RunOutcome.TIMED_OUT})


class StatsQuery(NamedTuple):
    """What ``run_stats`` reads for one schedule incarnation."""

    schedule_uid: str
    failures_since: datetime | None = None
    month_start: datetime | None = None


def _streak(rows: list[ExecutionRecord], failures_since: datetime | None) -> int:
    """Failed runs in a row, newest first, back to a success or to ``failures_since``."""
    streak = 0
    for row in rows:
        if failures_since is not None and row.started_at < failures_since:
            break
        if row.status is RunOutcome.SUCCEEDED:
            break
        if row.status in FAILED_OUTCOMES:
            streak += 1
    return streak


def _last_attempts(*where: sa.ColumnElement[bool]) -> sa.Subquery:
    """Each Job's last attempt among the rows matching ``where`` (a run counts as its last
    attempt's outcome)."""
    t = EXECUTIONS
    newest_first = sa.func.row_number().over(
        partition_by=t.c.job_uid,
        order_by=(t.c.attempt.desc(), t.c.started_at.desc(), t.c.id.desc()),
    )
    ranked = (
        sa.select(*execution_columns(include_output=False), newest_first.label("rank"))
        .where(*where)
        .subquery()
    )
    return (
        sa.select(*(c for c in ranked.c if c.name != "rank")).where(ranked.c.rank == 1).subquery()
    )


class CostPeriod(NamedTuple):
    """Cost of the runs started in one calendar period (start is local midnight in ``tz``)."""

    period_start: datetime
    cost_usd: Decimal


CostBy = Literal["day", "week", "month"]


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"tz: {tz!r} is not an IANA time zone name") from None


def month_start(moment: datetime, tz: str) -> datetime:
    """Local midnight on the 1st of ``moment``'s month in ``tz`` (the monthly budget's period)."""
    local = aware("moment", moment).astimezone(_zone(tz))
    return datetime(local.year, local.month, 1, tzinfo=local.tzinfo)


def next_month_start(moment: datetime, tz: str) -> datetime:
    """Local midnight on the 1st of the month after ``moment``'s, in ``tz``."""
    start = month_start(moment, tz)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month)


def cost_sum(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """SUM(cost_usd) of the rows matching ``where`` (FILTER), 0 when there are none."""
    return sa.func.coalesce(sa.func.sum(EXECUTIONS.c.cost_usd).filter(*where), 0)


def purged_cost(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """The purged runs' cost of the schedules matching ``where`` (on ``schedule_purged_totals``),
    0 when none: a scalar subquery, to be read in the statement that sums the kept rows."""
    p = PURGED_TOTALS
    total = sa.select(sa.func.coalesce(sa.func.sum(p.c.cost_usd), 0)).where(*where)
    return total.scalar_subquery()


def execution_columns(include_output: bool) -> list[sa.ColumnElement[Any]]:
    """The columns of an ExecutionRecord, in its order (``output`` NULL unless asked for)."""
    c = EXECUTIONS.c
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
        c.revision,
    ]


def _record(row: sa.Row[Any]) -> ExecutionRecord:
    values = dict(row._mapping)
    values["status"] = RunOutcome(values["status"])
    return ExecutionRecord(**values)


class RunReads(Repository):
    """The reads of ``schedule_executions``."""

    def spent_for_job(self, job_uid: str, *, exclude_pod_uid: str | None = None) -> Decimal:
        """Recorded cost of every attempt (pod) of a Job (grants not counted; ``reserve()``
        counts those); ``exclude_pod_uid`` leaves out one attempt."""
        t = EXECUTIONS
        query = sa.select(cost_sum()).where(t.c.job_uid == job_uid)
        if exclude_pod_uid is not None:
            query = query.where(t.c.pod_uid != exclude_pod_uid)
        with self._begin(f"read spent cost of job {job_uid}") as conn:
            return Decimal(conn.execute(query).scalar_one())

    def get(self, execution_id: int, *, include_output: bool = True) -> ExecutionRecord | None:
        """One execution by id, or None."""
        query = sa.select(*execution_columns(include_output)).where(EXECUTIONS.c.id == execution_id)
        with self._begin(f"read execution {execution_id}") as conn:
            row = conn.execute(query).first()
        return None if row is None else _record(row)

    def for_job(self, job_uid: str, *, include_output: bool = False) -> list[ExecutionRecord]:
        """Every attempt of a Job, oldest first."""
        t = EXECUTIONS
        query = (
            sa.select(*execution_columns(include_output))
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
        status: RunOutcome | str | Collection[RunOutcome | str] | None = None,
        limit: int = 50,
        before_id: int | None = None,
        include_output: bool = False,
        job_name: str | None = None,
    ) -> list[ExecutionRecord]:
        """Runs of a schedule started in [since, until), newest first, at most ``limit``
        (with ``job_name``: only that Job's attempts).

        Keyset pagination: pass the last id of a page as ``before_id`` for the next page.
        """
        check_page_limit(limit)
        t = EXECUTIONS
        what = f"list runs of {namespace}/{schedule_name}"
        query = (
            sa.select(*execution_columns(include_output))
            .where(*self._schedule_range(namespace, schedule_name, since, until))
            .order_by(t.c.started_at.desc(), t.c.id.desc())
            .limit(limit)
        )
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            query = query.where(t.c.status.in_([RunOutcome(s).value for s in wanted]))
        if job_name is not None:
            query = query.where(t.c.job_name == job_name)
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
        t = EXECUTIONS
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
        self, queries: Collection[StatsQuery], *, streak_limit: int = 100
    ) -> dict[str, RunStats]:
        """Totals and the current failure streak of schedule incarnations (by UID: a re-created
        schedule starts clean), derived from the rows (the source of truth, so replays and
        operator restarts never double-count) plus their purged totals; one read-only snapshot
        of four statements however many are asked (a pass reads one, the first pass after a
        start every schedule's, a burst of passes theirs together). Failures of Jobs started
        before a query's ``failures_since`` (a resume) do not count towards its streak; with
        its ``month_start``, also the cost of runs started since then. Every UID asked for has
        an entry."""
        if not queries:
            return {}
        t = EXECUTIONS
        asked = {q.schedule_uid: q for q in queries}
        months = sa.values(
            sa.column("uid", sa.Text),
            sa.column("month_start", sa.DateTime(timezone=True)),
            name="months",
        ).data(
            [
                (q.schedule_uid, aware("month_start", q.month_start) if q.month_start else None)
                for q in asked.values()
            ]
        )
        mine = t.c.schedule_uid.in_(list(asked))
        last = _last_attempts(mine)
        outcome = last.c.status
        counts = sa.select(
            last.c.schedule_uid,
            sa.func.count().filter(outcome == RunOutcome.SUCCEEDED.value).label("succeeded"),
            sa.func.count().filter(outcome.in_([s.value for s in FAILED_OUTCOMES])).label("failed"),
        ).group_by(last.c.schedule_uid)
        totals = (
            sa.select(
                t.c.schedule_uid,
                cost_sum().label("total_cost"),
                sa.func.max(t.c.started_at)
                .filter(t.c.status == RunOutcome.SUCCEEDED.value)
                .label("last_success_at"),
                # Typed: a VALUES column of NULLs alone (no query asked for a month) is text.
                cost_sum(
                    t.c.started_at >= sa.cast(months.c.month_start, sa.DateTime(timezone=True))
                ).label("month_cost"),
            )
            .select_from(t.join(months, months.c.uid == t.c.schedule_uid))
            .group_by(t.c.schedule_uid)
        )
        recency = sa.func.row_number().over(
            partition_by=last.c.schedule_uid, order_by=(last.c.started_at.desc(), last.c.id.desc())
        )
        finished = (
            sa.select(last, recency.label("recency"))
            .where(outcome != RunOutcome.RUNNING.value)
            .subquery()
        )
        recent = (
            sa.select(*(c for c in finished.c if c.name != "recency"))
            .where(finished.c.recency <= streak_limit)
            .order_by(finished.c.schedule_uid, finished.c.started_at.desc(), finished.c.id.desc())
        )
        p = PURGED_TOTALS
        purged_query = sa.select(p.c.schedule_uid, p.c.cost_usd, p.c.succeeded, p.c.failed).where(
            p.c.schedule_uid.in_(list(asked))
        )
        with self._begin(f"read run statistics of {len(asked)} schedules") as conn:
            # One snapshot: a purge moving rows into their totals meanwhile is counted once.
            conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            counted = {row.schedule_uid: row for row in conn.execute(counts)}
            summed = {row.schedule_uid: row for row in conn.execute(totals)}
            purged = {row.schedule_uid: row for row in conn.execute(purged_query)}
            rows: dict[str, list[ExecutionRecord]] = {}
            for row in conn.execute(recent):
                record = _record(row)
                rows.setdefault(record.schedule_uid or "", []).append(record)
        stats: dict[str, RunStats] = {}
        for uid, query in asked.items():
            count, total, recents = counted.get(uid), summed.get(uid), rows.get(uid, [])
            month_cost = total.month_cost if total is not None else 0
            gone = purged.get(uid)
            stats[uid] = RunStats(
                Decimal(total.total_cost if total is not None else 0)
                + (gone.cost_usd if gone is not None else 0),
                (int(count.succeeded) if count is not None else 0)
                + (int(gone.succeeded) if gone is not None else 0),
                (int(count.failed) if count is not None else 0)
                + (int(gone.failed) if gone is not None else 0),
                _streak(recents, query.failures_since),
                recents[0] if recents else None,
                last_success_at=total.last_success_at if total is not None else None,
                month_cost=None if query.month_start is None else Decimal(month_cost),
            )
        return stats

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
        of that incarnation's runs only. Without a range, the lifetime total: the purged runs'
        cost too (a range reads only the runs kept)."""
        columns = [cost_sum()]
        if since is None and until is None:
            p = PURGED_TOTALS
            columns.append(
                purged_cost(
                    *(
                        [p.c.namespace == namespace, p.c.schedule_name == schedule_name]
                        if schedule_uid is None
                        else [p.c.schedule_uid == schedule_uid]
                    )
                )
            )
        query = sa.select(*columns).where(
            *self._schedule_range(namespace, schedule_name, since, until, schedule_uid)
        )
        with self._begin(f"sum cost of {namespace}/{schedule_name}") as conn:
            return sum((Decimal(v) for v in conn.execute(query).one()), Decimal(0))

    def running(self, schedule_uid: str, *, limit: int = 100) -> list[ExecutionRecord]:
        """The RUNNING attempts of a schedule UID (in flight, holding their grants), oldest
        first."""
        check_page_limit(limit)
        t = EXECUTIONS
        query = (
            sa.select(*execution_columns(False))
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
        t = EXECUTIONS
        query = (
            sa.select(*execution_columns(False))
            # A literal, not a parameter: the planner must see it to use the partial index.
            .where(t.c.status == sa.literal_column("'RUNNING'"), t.c.started_at < cutoff)
            .order_by(t.c.started_at)
            .limit(limit)
        )
        with self._begin("list stuck RUNNING executions") as conn:
            return [_record(row) for row in conn.execute(query)]

    @staticmethod
    def _schedule_range(
        namespace: str,
        schedule_name: str,
        since: datetime | None,
        until: datetime | None,
        schedule_uid: str | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        t = EXECUTIONS
        # A UID names one incarnation on its own (and leads its index); names are for people.
        where = (
            [t.c.namespace == namespace, t.c.schedule_name == schedule_name]
            if schedule_uid is None
            else [t.c.schedule_uid == schedule_uid]
        )
        if since is not None:
            where.append(t.c.started_at >= aware("since", since))
        if until is not None:
            where.append(t.c.started_at < aware("until", until))
        return where
