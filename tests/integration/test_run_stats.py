"""Run statistics are derived from the rows: one run per Job, outcome of its last attempt."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from nocturne_operator.storage import ExecutionKey, History, RunStats, StatsQuery, upgrade

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def stats_of(
    history: History,
    uid: str = "uid-1",
    *,
    failures_since: datetime | None = None,
    month_start: datetime | None = None,
) -> RunStats:
    """One incarnation's statistics, read alone."""
    return history.run_stats([StatsQuery(uid, failures_since, month_start)])[uid]


@pytest.fixture
def history(postgres: PostgresServer) -> Iterator[History]:
    url = postgres.fresh_schema(f"stats_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    with History.connect(url) as store:
        yield store


def attempt(
    history: History,
    job: str,
    n: int,
    status: RunOutcome,
    hour: int,
    *,
    cost: str = "0.10",
    uid: str = "uid-1",
) -> None:
    key = ExecutionKey("ns", "news", uid, f"news-{job}", f"job-{job}", f"pod-{job}-{n}", n)
    run_id = history.start(
        key, model="m", provider="offline", started_at=T0 + timedelta(hours=hour, minutes=n)
    )
    if status is not RunOutcome.RUNNING:
        history.finish(
            run_id,
            status=status,
            completed_at=T0 + timedelta(hours=hour, minutes=n + 1),
            cost_usd=Decimal(cost),
            input_tokens=1,
            output_tokens=1,
        )


def test_runs_are_counted_per_job_by_their_last_attempt(history: History) -> None:
    attempt(history, "a", 0, RunOutcome.FAILED, 0)
    attempt(history, "a", 1, RunOutcome.SUCCEEDED, 0)  # a retry that healed: a success
    attempt(history, "b", 0, RunOutcome.FAILED, 1)
    attempt(history, "c", 0, RunOutcome.CANCELLED, 2)  # deletion: not a failure
    attempt(history, "d", 0, RunOutcome.TIMED_OUT, 3)
    attempt(history, "e", 0, RunOutcome.RUNNING, 4, cost="0")
    stats = stats_of(history)
    assert (stats.succeeded, stats.failed) == (1, 2)
    assert stats.consecutive_failures == 2
    assert stats.total_cost == Decimal("0.500000")
    assert stats.last_run is not None
    assert stats.last_run.job_uid == "job-d"


def test_a_resume_restarts_the_streak(history: History) -> None:
    for i, job in enumerate("abc"):
        attempt(history, job, 0, RunOutcome.FAILED, i)
    assert stats_of(history).consecutive_failures == 3
    resumed = T0 + timedelta(hours=1, minutes=30)
    assert stats_of(history, failures_since=resumed).consecutive_failures == 1


def test_no_runs(history: History) -> None:
    stats = stats_of(history, "uid-never")
    assert stats == type(stats)(Decimal(0), 0, 0, 0, None)


def test_last_success_and_the_cost_since_the_month_started(history: History) -> None:
    attempt(history, "a", 0, RunOutcome.SUCCEEDED, 0, cost="1.00")
    attempt(history, "b", 0, RunOutcome.FAILED, 2, cost="0.25")
    attempt(history, "c", 0, RunOutcome.SUCCEEDED, 5, cost="0.50")
    attempt(history, "d", 0, RunOutcome.FAILED, 7, cost="0.05")
    stats = stats_of(history, month_start=T0 + timedelta(hours=3))
    assert stats.last_success_at == T0 + timedelta(hours=5)
    assert stats.month_cost == Decimal("0.55")
    assert stats_of(history).month_cost is None


def test_a_schedule_uid_counts_only_that_incarnation(history: History) -> None:
    """A schedule deleted and re-created under the same name is a new schedule: its totals,
    streak, last run and month cost start clean."""
    attempt(history, "a", 0, RunOutcome.FAILED, 0, cost="1.00", uid="uid-old")
    attempt(history, "b", 0, RunOutcome.FAILED, 1, cost="2.00", uid="uid-old")
    attempt(history, "c", 0, RunOutcome.SUCCEEDED, 2, cost="0.25", uid="uid-new")
    attempt(history, "d", 0, RunOutcome.FAILED, 3, cost="0.05", uid="uid-new")
    month = T0 + timedelta(hours=1)
    new = stats_of(history, "uid-new", month_start=month)
    assert (new.total_cost, new.succeeded, new.failed, new.consecutive_failures) == (
        Decimal("0.30"),
        1,
        1,
        1,
    )
    assert new.last_run is not None
    assert (new.last_run.job_uid, new.last_run.schedule_uid) == ("job-d", "uid-new")
    assert (new.last_success_at, new.month_cost) == (T0 + timedelta(hours=2), Decimal("0.30"))
    old = stats_of(history, "uid-old")
    assert (old.total_cost, old.succeeded, old.failed, old.consecutive_failures) == (
        Decimal("3.00"),
        0,
        2,
        2,
    )
    assert old.last_success_at is None
    assert history.total_cost("ns", "news", schedule_uid="uid-new") == Decimal("0.30")
    assert history.total_cost("ns", "news", schedule_uid="uid-gone") == Decimal(0)
    assert stats_of(history, "uid-gone") == type(new)(Decimal(0), 0, 0, 0, None)


def test_many_schedules_at_once_read_what_each_reads_alone(history: History) -> None:
    """The first pass after a start reads every schedule's statistics in one go; each must
    be exactly what a read of it alone gives."""
    outcomes = [
        RunOutcome.SUCCEEDED,
        RunOutcome.FAILED,
        RunOutcome.TIMED_OUT,
        RunOutcome.CANCELLED,
        RunOutcome.BUDGET_EXCEEDED,
    ]
    for s in range(6):
        uid = f"uid-{s}"
        for j in range(s * 2):  # uid-0 has no runs at all
            job = f"{s}-{j}"
            status = outcomes[(s + j) % len(outcomes)]
            if j % 3 == 1:  # a failed attempt, then its retry
                attempt(history, job, 0, RunOutcome.FAILED, j, cost="0.03", uid=uid)
                attempt(history, job, 1, status, j, cost="0.07", uid=uid)
            else:
                attempt(history, job, 0, status, j, cost=f"0.{s}{j}", uid=uid)
        if s % 2:
            attempt(history, f"{s}-live", 0, RunOutcome.RUNNING, 20, cost="0", uid=uid)
    month = T0 + timedelta(hours=4)
    queries = [
        StatsQuery(f"uid-{s}", failures_since=T0 + timedelta(hours=s), month_start=month)
        for s in range(6)
    ] + [StatsQuery("uid-none"), StatsQuery("uid-5-again", month_start=month)]
    many = history.run_stats(queries)
    assert set(many) == {q.schedule_uid for q in queries}
    for q in queries:
        assert many[q.schedule_uid] == history.run_stats([q])[q.schedule_uid], q
    assert many["uid-3"].failed > 0
    assert many["uid-3"].last_run is not None
    assert many["uid-none"] == type(many["uid-none"])(Decimal(0), 0, 0, 0, None)
    assert history.run_stats([]) == {}
