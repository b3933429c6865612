"""Writes of run records: the run API reserves an attempt's budget (``reserve``) and reports its
progress and end (``record_progress``, ``finish``); the operator records attempts that never
reserved (``start``) and finishes what the reaper finds abandoned.

Writes are short transactions keyed so that replaying them changes nothing: ``reserve`` and
``start`` are keyed by Job UID + pod UID, ``record_progress`` and ``finish`` never lower a cost,
and the first final status wins. Budgets are reserved centrally: ``reserve`` decides an
attempt's grant under a per-schedule-UID lock, counting every in-flight grant, so concurrent
Jobs and retries never overspend a schedule's caps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple, cast, get_args

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import MAX_USD, NoGrantReason, RunOutcome, grant_usd, json_document
from nocturne_operator.storage.engine import ExecutionNotFoundError, HistoryError, Repository
from nocturne_operator.storage.queries import (
    cost_sum,
    execution_columns,
    month_start,
    purged_cost,
)
from nocturne_operator.storage.schema import EXECUTIONS, NAMESPACE_BUDGETS, PURGED_TOTALS
from nocturne_operator.storage.state import StateToSave, save_state_in
from nocturne_operator.storage.values import (
    ERROR_LIMIT_BYTES,
    OUTPUT_LIMIT_BYTES,
    aware,
    clean_text,
    tokens,
    usd,
)

__all__ = ["Caps", "ExecutionKey", "GrantRecord", "RunWrites"]

log = logging.getLogger(__name__)

# Seed of hashtextextended(schedule_uid, seed): the pg_advisory_xact_lock key under which
# reserve() decides a schedule's grants ("noct" + "budg"). A collision only serialises two
# schedules' reservations; it never mixes their sums.
_BUDGET_LOCK_SEED = 0x6E6F6374_62756467
# The same for a namespace's monthly budget ("noct" + "nsbg"), taken before the schedule's.
_NAMESPACE_LOCK_SEED = 0x6E6F6374_6E736267


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
    asked: Decimal | None = None
    """The schedule's own maxPerRunUSD: where a policy sets the namespace's per-run cap
    (``namespace_budgets``), ``per_run`` is this under that cap instead of the cluster's."""

    def __post_init__(self) -> None:
        for name in ("per_run", "total", "monthly", "asked"):
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
            aware("Caps.month_start", self.month_start)


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


def _committed_sum(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    """SUM of what the rows matching ``where`` hold of a budget, 0 when there are none: a final
    row its cost; a RUNNING row its grant too, which it may still spend (a row without a grant
    counts at its cost)."""
    t = EXECUTIONS
    held = sa.case(
        (
            t.c.status == RunOutcome.RUNNING.value,
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


def _amount(value: Decimal) -> str:
    """A USD amount for messages: at least 2 decimals, no trailing zeros beyond them."""
    text = f"{value.normalize():f}"
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def _new_attempt(
    key: ExecutionKey, attempt: int, started_at: datetime, model: str, provider: str
) -> dict[str, Any]:
    """The columns of a new RUNNING attempt of ``key`` (``reserve()`` adds its grant)."""
    return {
        "namespace": key.namespace,
        "schedule_name": key.schedule_name,
        "schedule_uid": key.schedule_uid,
        "job_name": key.job_name,
        "job_uid": key.job_uid,
        "pod_uid": key.pod_uid,
        "attempt": attempt,
        "manual_request": key.manual_request,
        "status": RunOutcome.RUNNING.value,
        "started_at": started_at,
        "model": model,
        "provider": provider,
    }


def _insert_attempt(values: dict[str, Any]) -> sa.Insert:
    """Insert an attempt, returning its id; nothing (no row) when its (job_uid, pod_uid) exists."""
    return (
        pg.insert(EXECUTIONS)
        .values(values)
        .on_conflict_do_nothing(constraint="uq_schedule_executions_job_uid_pod_uid")
        .returning(EXECUTIONS.c.id)
    )


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


_NO_GRANT_REASONS: frozenset[str] = frozenset(get_args(NoGrantReason))
_OVERRUN: sa.ColumnElement[Any] = sa.literal_column("""'{"overrun": true}'::jsonb""")


class RunWrites(Repository):
    """The writes of ``schedule_executions``."""

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
        aware("started_at", started_at)
        if not isinstance(caps, Caps):
            raise TypeError(f"caps: {caps!r} must be a Caps")
        t = EXECUTIONS
        what = (
            f"reserve the budget of {key.namespace}/{key.schedule_name} job {key.job_name} "
            f"pod {key.pod_uid}"
        )
        lock = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:uid, :seed))").bindparams(
            uid=key.schedule_uid, seed=_BUDGET_LOCK_SEED
        )
        with self._begin(what) as conn:
            # A namespace with a monthly budget (AgentSchedulePolicy): its lock first, always in
            # this order, so reservations of all its schedules see each other.
            row = sa.select(NAMESPACE_BUDGETS).where(NAMESPACE_BUDGETS.c.namespace == key.namespace)
            budget = conn.execute(row).first()
            if budget is not None and budget.max_monthly_usd is not None:
                conn.execute(
                    sa.text(
                        "SELECT pg_advisory_xact_lock(hashtextextended(:ns, :seed))"
                    ).bindparams(ns=key.namespace, seed=_NAMESPACE_LOCK_SEED)
                )
                budget = conn.execute(row).first()  # as it is now, not before the wait
            if budget is not None and budget.max_per_run_usd is not None and caps.asked:
                # The namespace's policy sets the per-run cap there, instead of the cluster's.
                caps = replace(caps, per_run=min(caps.asked, Decimal(budget.max_per_run_usd)))
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
                    cost_sum(),
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
            if budget is not None and budget.max_monthly_usd is not None and refusal is None:
                refusal, limit = self._namespace_left(conn, key, budget, started_at, limit)
            values = _new_attempt(key, int(attempts), started_at, model, provider)
            values["granted_usd"] = limit
            if refusal is not None:
                reason, message = refusal
                values |= {
                    "status": RunOutcome.BUDGET_EXCEEDED.value,
                    "completed_at": started_at,
                    "error": clean_text(message, ERROR_LIMIT_BYTES),
                    "metadata": {"refused": reason},
                }
            new_id = conn.execute(_insert_attempt(values)).scalar_one_or_none()
            if new_id is None:  # a racing reservation under another schedule UID's lock
                return self._replayed(conn, key, self._conflicting_row(conn, key, what), what)
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
        t = EXECUTIONS
        # The purged runs' cost (retention), in the statement that sums the kept rows: a purge
        # moving rows into it meanwhile is counted once.
        purged = purged_cost(PURGED_TOTALS.c.schedule_uid == key.schedule_uid)
        columns = [_committed_sum(), cost_sum(), purged]
        # Caps makes month_start present whenever monthly is.
        month_start = caps.month_start if caps.monthly is not None else None
        if month_start is not None:
            since = t.c.started_at >= month_start
            columns += [_committed_sum(since), cost_sum(since)]
        # Only this UID's rows: a re-created schedule of the same name starts clean.
        committed, spent, gone, *month = conn.execute(
            sa.select(*columns).where(t.c.schedule_uid == key.schedule_uid)
        ).one()
        schedule = _Held(Decimal(committed) + gone, Decimal(spent) + gone)
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
        limit = grant_usd(min(MAX_USD, max(Decimal(0), min(amount for _, amount, _ in left))))
        if limit > 0:
            return None, limit
        reason, _, message = next(item for item in left if grant_usd(item[1]) <= 0)
        return (reason, message), Decimal(0)

    @staticmethod
    def _namespace_left(
        conn: sa.Connection,
        key: ExecutionKey,
        budget: sa.Row[Any],
        started_at: datetime,
        limit: Decimal,
    ) -> tuple[tuple[NoGrantReason, str] | None, Decimal]:
        """``limit``, lowered to what the namespace's monthly budget has left (every schedule
        of the namespace: spent, and granted to runs still running), or the refusal."""
        t = EXECUTIONS
        since = month_start(started_at, budget.time_zone)
        committed, spent = conn.execute(
            sa.select(_committed_sum(), cost_sum()).where(
                t.c.namespace == key.namespace, t.c.started_at >= since
            )
        ).one()
        month = _Held(Decimal(committed), Decimal(spent))
        left = grant_usd(max(Decimal(0), Decimal(budget.max_monthly_usd) - month.committed))
        if left > 0:
            return None, min(limit, left)
        message = (
            month.describe(
                "the namespace's maxMonthlyUSD",
                Decimal(budget.max_monthly_usd),
                f"running Jobs in namespace {key.namespace}",
                f" for the month from {since.isoformat()}",
            )
            + f' (AgentSchedulePolicy "{budget.policy or "?"}")'
        )
        return ("NamespaceBudgetReached", message), Decimal(0)

    @staticmethod
    def _attempt_row(conn: sa.Connection, key: ExecutionKey) -> sa.Row[Any] | None:
        t = EXECUTIONS
        return conn.execute(
            sa.select(*execution_columns(False)).where(
                t.c.job_uid == key.job_uid, t.c.pod_uid == key.pod_uid
            )
        ).first()

    @classmethod
    def _conflicting_row(cls, conn: sa.Connection, key: ExecutionKey, what: str) -> sa.Row[Any]:
        """The row whose (job_uid, pod_uid) an insert of ``key`` just conflicted with."""
        row = cls._attempt_row(conn, key)
        if row is None:  # only runs months old are ever deleted (retention): a bug
            raise HistoryError(f"{what}: the conflicting attempt vanished")
        return row

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
        t = EXECUTIONS
        before = conn.execute(
            sa.select(_committed_sum()).where(t.c.job_uid == key.job_uid, t.c.id < row.id)
        ).scalar_one()
        reason = (row.metadata or {}).get("refused")
        refused = (
            cast(NoGrantReason, reason)
            if row.status == RunOutcome.BUDGET_EXCEEDED.value and reason in _NO_GRANT_REASONS
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
        aware("started_at", started_at)
        insert = _insert_attempt(_new_attempt(key, key.attempt, started_at, model, provider))
        what = f"start execution of {key.namespace}/{key.schedule_name} job {key.job_name}"
        with self._begin(what) as conn:
            new_id = conn.execute(insert).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            row = self._conflicting_row(conn, key, what)
        if (row.namespace, row.schedule_name) != (key.namespace, key.schedule_name):
            raise HistoryError(
                f"{what}: job UID {key.job_uid} pod UID {key.pod_uid} already belongs to "
                f"execution {row.id} of {row.namespace}/{row.schedule_name}"
            )
        return int(row.id)

    def record_progress(
        self,
        execution_id: int,
        *,
        cost_usd: Decimal,
        input_tokens: int,
        output_tokens: int,
        reserved_usd: Decimal = Decimal(0),
    ) -> None:
        """Raise a RUNNING execution's cost and token counts to the given totals (never lower
        them) and set what it has reserved for the call in flight (``reserved_usd``: charged
        when it ends without a final report); a no-op once the execution is final.

        A cost above the attempt's grant is still recorded (it was spent), flagged
        ``metadata.overrun`` and logged as a warning: the schedule's later grants shrink by it.
        """
        cost = usd("cost_usd", cost_usd)
        reserved = usd("reserved_usd", reserved_usd)
        tokens_in = tokens("input_tokens", input_tokens)
        tokens_out = tokens("output_tokens", output_tokens)
        t = EXECUTIONS
        raised = sa.func.greatest(t.c.cost_usd, cost)
        update = (
            sa.update(t)
            .where(t.c.id == execution_id, t.c.status == RunOutcome.RUNNING.value)
            .values(
                cost_usd=raised,
                input_tokens=sa.func.greatest(t.c.input_tokens, tokens_in),
                output_tokens=sa.func.greatest(t.c.output_tokens, tokens_out),
                # A report delivered late (the one before a call, after the one after it: the
                # client retries) carries a lower cost: it does not bring its reservation back.
                reserved_usd=sa.case((cost >= t.c.cost_usd, reserved), else_=t.c.reserved_usd),
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
        status: RunOutcome | str,
        completed_at: datetime,
        cost_usd: Decimal,
        input_tokens: int,
        output_tokens: int,
        output: str | None = None,
        error: str | None = None,
        alert: bool = False,
        alert_reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        saving: StateToSave | None = None,
        in_flight: bool = False,
    ) -> RunOutcome:
        """Record the final status and return the status now stored; when that is SUCCEEDED,
        ``saving`` (validated first: StateTooLargeError) is saved in the same transaction, so
        a recorded success never lacks the state it handed on.

        The first final status wins: a replay, or a later finish by someone else (the reaper),
        keeps status, output and error, but cost and tokens still only ever rise. Output and
        error are truncated to OUTPUT_LIMIT_BYTES / ERROR_LIMIT_BYTES. A cost above the grant
        is recorded as reported, flagged ``metadata.overrun`` and logged (see record_progress).

        ``in_flight``: the attempt ended without its runner's final word (the operator records
        it from the Job, or reaps it), so the call it may have had in flight is charged too:
        the cost so far plus the last reported reservation, at most the grant.
        """
        final = RunOutcome(status)
        if final is RunOutcome.RUNNING:
            raise ValueError("finish(): status RUNNING is not a final status")
        aware("completed_at", completed_at)
        cost = usd("cost_usd", cost_usd)
        tokens_in = tokens("input_tokens", input_tokens)
        tokens_out = tokens("output_tokens", output_tokens)
        meta = dict(metadata or {})
        json_document("finish(): metadata", meta)
        if saving is not None:
            saving.validate()
        t = EXECUTIONS
        what = f"finish execution {execution_id} as {final.value}"
        with self._begin(what) as conn:
            row = conn.execute(
                sa.select(t.c.status, t.c.cost_usd, t.c.granted_usd, t.c.reserved_usd)
                .where(t.c.id == execution_id)
                .with_for_update()
            ).first()
            if row is None:
                raise ExecutionNotFoundError(f"{what}: no such execution")
            current = row.status
            if in_flight and current == RunOutcome.RUNNING and row.reserved_usd > 0:
                worst = row.cost_usd + row.reserved_usd
                if row.granted_usd is not None:
                    worst = min(worst, max(row.granted_usd, row.cost_usd))
                cost = max(cost, worst)
            overrun = row.granted_usd is not None and max(row.cost_usd, cost) > row.granted_usd
            if overrun and (current == RunOutcome.RUNNING or cost > row.cost_usd):
                _warn_overrun(what, max(row.cost_usd, cost), row.granted_usd)
            values: dict[str, Any] = {
                "cost_usd": sa.func.greatest(t.c.cost_usd, cost),
                "input_tokens": sa.func.greatest(t.c.input_tokens, tokens_in),
                "output_tokens": sa.func.greatest(t.c.output_tokens, tokens_out),
                "reserved_usd": 0,
                "updated_at": sa.func.now(),
            }
            if current == RunOutcome.RUNNING:
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
                stored: RunOutcome = final
            else:
                stored = RunOutcome(current)
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
                        values | {"metadata": t.c["metadata"].op("||")(_OVERRUN)}
                        if overrun
                        else values
                    )
                )
            if saving is not None and stored is RunOutcome.SUCCEEDED:
                save_state_in(conn, saving, execution_id)
            return stored

    @staticmethod
    def _exists(conn: sa.Connection, execution_id: int) -> bool:
        query = sa.select(sa.literal(1)).where(EXECUTIONS.c.id == execution_id)
        return conn.execute(query).first() is not None
