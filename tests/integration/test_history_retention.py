"""The retention purge against a real PostgreSQL: only old finished runs go, whole Jobs at a
time and in batches; what they added up to stays in the lifetime sums (a maxTotalUSD cap stays
closed, totals and run counts do not move); runs since a schedule's last success, RUNNING rows
and a live schedule's creation stay; a second purge finds nothing. The sweep purges a bounded
number of batches and counts the rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from nocturne_operator.adapters.metrics import REGISTRY
from nocturne_operator.controller.sweep import PURGE_BATCHES, purge_expired
from nocturne_operator.settings import load_settings
from nocturne_operator.storage import (
    Caps,
    ExecutionKey,
    GrantRecord,
    History,
    StateToSave,
    StatsQuery,
)
from nocturne_operator.storage.retention import _PURGE_LOCK_KEY
from nocturne_operator.storage.schema import PURGED_TOTALS

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BEFORE = NOW - timedelta(days=400)  # the default retention's cutoff
D = Decimal
ROOMY = Caps(D(10))


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def attempt(
    history: History,
    job: str,
    status: RunOutcome | None,
    started: datetime,
    *,
    cost: str = "0.10",
    pod: str = "0",
    uid: str = "uid-a",
    name: str = "digest",
    caps: Caps = ROOMY,
    saving: StateToSave | None = None,
) -> GrantRecord:
    """One attempt of Job ``job``, reserved at ``started`` and, unless ``status`` is None
    (still RUNNING), finished a minute later at ``cost``."""
    key = ExecutionKey("ns", name, uid, f"{name}-{job}", f"juid-{uid}-{job}", f"pod-{pod}", 0)
    grant = history.reserve(key, model="m", provider="offline", started_at=started, caps=caps)
    if status is not None:
        history.finish(
            grant.execution_id,
            status=status,
            completed_at=started + timedelta(minutes=1),
            cost_usd=D(cost),
            input_tokens=100,
            output_tokens=10,
            saving=saving,
        )
    return grant


def purged(history: History, uid: str) -> dict[str, object] | None:
    with history.engine.connect() as conn:
        row = conn.execute(
            sa.select(PURGED_TOTALS).where(PURGED_TOTALS.c.schedule_uid == uid)
        ).first()
    return None if row is None else dict(row._mapping)


def job_names(history: History, name: str = "digest") -> list[str]:
    return sorted({r.job_name for r in history.runs("ns", name, limit=1000)})


def purge_all(history: History, before: datetime = BEFORE, limit: int = 500) -> list[int]:
    """Batches until one deletes nothing: the rows each deleted."""
    batches = [history.purge_runs(before, limit=limit)]
    while batches[-1]:
        batches.append(history.purge_runs(before, limit=limit))
    return batches


def test_old_final_runs_go_in_batches_whole_jobs_at_a_time(history: History) -> None:
    failed, ok = RunOutcome.FAILED, RunOutcome.SUCCEEDED
    attempt(history, "a1", failed, days_ago(500))
    attempt(history, "a1", ok, days_ago(500) + timedelta(hours=1), pod="1")  # its retry
    attempt(history, "a2", failed, days_ago(490), cost="0.20")
    attempt(history, "a3", ok, days_ago(480), cost="0.30")
    attempt(history, "a4", None, days_ago(470))  # left RUNNING: never purged
    attempt(history, "a5", ok, days_ago(10))
    attempt(history, "a6", failed, days_ago(5))
    query = [StatsQuery("uid-a")]
    stats = history.run_stats(query)

    # A batch of one attempt takes its Job's retry along; then a Job per batch; then nothing.
    assert purge_all(history, limit=1) == [2, 1, 1, 0]
    assert job_names(history) == ["digest-a4", "digest-a5", "digest-a6"]
    assert history.run_stats(query) == stats  # totals, counts, streak, last run, last success
    carried = purged(history, "uid-a")
    assert carried is not None
    assert (carried["namespace"], carried["schedule_name"]) == ("ns", "digest")
    assert carried["cost_usd"] == D("0.70")
    assert (carried["attempts"], carried["succeeded"], carried["failed"]) == (4, 2, 1)
    assert (carried["input_tokens"], carried["output_tokens"]) == (400, 40)
    assert carried["first_started_at"] == days_ago(500)
    assert carried["last_started_at"] == days_ago(480)

    # Idempotent: a second purge finds nothing and carries nothing twice.
    assert purge_all(history) == [0]
    assert purged(history, "uid-a") == carried


def test_runs_since_the_last_success_and_of_a_schedule_never_successful_stay(
    history: History,
) -> None:
    failed, ok = RunOutcome.FAILED, RunOutcome.SUCCEEDED
    attempt(history, "b0", ok, days_ago(600))
    attempt(history, "b1", ok, days_ago(500))  # the latest success
    attempt(history, "b2", failed, days_ago(490))
    attempt(history, "b3", failed, days_ago(480))
    attempt(history, "c1", failed, days_ago(500), uid="uid-c", name="never")
    query = [StatsQuery("uid-a"), StatsQuery("uid-c")]
    stats = history.run_stats(query)
    assert stats["uid-a"].consecutive_failures == 2

    assert purge_all(history) == [1, 0]
    assert job_names(history) == ["digest-b1", "digest-b2", "digest-b3"]
    assert job_names(history, "never") == ["never-c1"]
    assert history.run_stats(query) == stats
    assert purged(history, "uid-c") is None


def test_carried_totals_keep_a_total_cap_where_it_was(history: History) -> None:
    ok = RunOutcome.SUCCEEDED
    attempt(history, "d1", ok, days_ago(500), cost="0.60")
    attempt(history, "d2", ok, days_ago(450), cost="0.40")
    attempt(history, "d3", ok, days_ago(420), cost="0")  # the latest success: kept
    attempt(history, "e1", ok, days_ago(500), cost="0.25", uid="uid-e")  # same name, re-created
    attempt(history, "e2", ok, days_ago(10), cost="0.05", uid="uid-e")
    closed = Caps(D(1), total=D("1.00"))
    half = Caps(D(1), total=D("1.50"))

    def grants(round_: str) -> tuple[GrantRecord, GrantRecord]:
        return (
            attempt(history, f"closed-{round_}", None, NOW, caps=closed),
            attempt(history, f"half-{round_}", None, NOW, caps=half),
        )

    totals = (
        history.total_cost("ns", "digest"),
        history.total_cost("ns", "digest", schedule_uid="uid-a"),
        history.total_cost("ns", "digest", schedule_uid="uid-e"),
    )
    refused, limited = grants("before")
    assert refused.refused == "TotalBudgetReached"
    assert limited.limit == D("0.5")
    for grant in (refused, limited):
        history.finish(
            grant.execution_id,
            status=RunOutcome.CANCELLED,
            completed_at=NOW,
            cost_usd=D(0),
            input_tokens=0,
            output_tokens=0,
        )

    assert purge_all(history) == [3, 0]
    assert purged(history, "uid-a") is not None
    assert history.total_cost("ns", "digest", schedule_uid="uid-a") == D("1.00")
    refused_after, limited_after = grants("after")
    assert (refused_after.refused, refused_after.message) == (refused.refused, refused.message)
    assert "maxTotalUSD 1.00 reached: 1.00 spent" in str(refused_after.message)
    assert limited_after.limit == limited.limit
    # Lifetime sums did not move; a range reads only the runs kept.
    assert (
        history.total_cost("ns", "digest"),
        history.total_cost("ns", "digest", schedule_uid="uid-a"),
        history.total_cost("ns", "digest", schedule_uid="uid-e"),
    ) == totals
    assert history.total_cost("ns", "digest", since=days_ago(1000)) == D("0.05")
    assert history.run_stats([StatsQuery("uid-a")])["uid-a"].total_cost == D("1.00")


def test_a_purged_run_leaves_the_state_it_saved(history: History) -> None:
    def saving(key: str, value: int) -> StateToSave:
        return StateToSave("ns", "digest", key, "uid-a", {"seen": value}, f"output {value}")

    ok = RunOutcome.SUCCEEDED
    attempt(history, "f1", ok, days_ago(500), saving=saving("old", 1))
    attempt(history, "f2", ok, days_ago(10), saving=saving("new", 2))
    assert purge_all(history) == [1, 0]
    old = history.load_state("ns", "digest", "old", schedule_uid="uid-a")
    assert old is not None
    assert (old.state, old.execution_id) == ({"seen": 1}, None)  # ON DELETE SET NULL
    new = history.load_state("ns", "digest", "new", schedule_uid="uid-a")
    assert new is not None
    assert new.execution_id is not None


def test_audit_rows_go_by_age_but_a_live_schedule_keeps_its_creation(history: History) -> None:
    old, recent = days_ago(500), days_ago(5)
    live = history.record_event("ns", "digest", "created", schedule_uid="uid-live", at=old)
    history.record_event("ns", "digest", "paused", schedule_uid="uid-live", at=old)
    history.record_event("ns", "digest", "resumed", schedule_uid="uid-live", at=recent)
    history.record_event("ns", "gone", "created", schedule_uid="uid-gone", at=old)
    history.record_event("ns", "gone", "deleted", schedule_uid="uid-gone", at=old)
    history.record_event("ns", "late", "created", schedule_uid="uid-late", at=old)
    history.record_event("ns", "late", "deleted", schedule_uid="uid-late", at=recent)
    history.record_event("ns", "digest", "drift_repaired", at=old)  # no UID

    assert history.purge_events(BEFORE, limit=1) == 1  # the oldest row the batch may take
    assert history.purge_events(BEFORE, limit=500) == 3  # the rest; `gone` with its creation
    assert history.purge_events(BEFORE, limit=500) == 0
    kept = {
        name: [e.kind for e in history.events("ns", name)] for name in ("digest", "gone", "late")
    }
    assert kept == {"digest": ["resumed", "created"], "gone": [], "late": ["deleted", "created"]}
    # A creation reported again (an operator restart) still finds the first row.
    assert history.record_event("ns", "digest", "created", schedule_uid="uid-live") == live


def test_a_second_purge_at_the_same_time_deletes_nothing(history: History) -> None:
    attempt(history, "g1", RunOutcome.SUCCEEDED, days_ago(500))
    attempt(history, "g2", RunOutcome.SUCCEEDED, days_ago(10))
    history.record_event("ns", "digest", "paused", at=days_ago(500))
    with history.engine.connect() as other:
        other.execute(sa.select(sa.func.pg_advisory_xact_lock(_PURGE_LOCK_KEY)))
        assert history.purge_runs(BEFORE) == 0
        assert history.purge_events(BEFORE) == 0
        other.rollback()
    assert history.purge_runs(BEFORE) == 1
    assert history.purge_events(BEFORE) == 1


@pytest.mark.parametrize("limit", [0, 10_001, True])
def test_a_batch_has_a_size(history: History, limit: int) -> None:
    with pytest.raises(ValueError, match=r"limit: .* must be an integer from 1 to 10000"):
        history.purge_runs(BEFORE, limit=limit)


def test_table_stats_name_every_table_with_its_size_and_oldest_row(history: History) -> None:
    attempt(history, "h1", RunOutcome.SUCCEEDED, days_ago(500))
    attempt(history, "h2", RunOutcome.SUCCEEDED, days_ago(10))
    history.record_event("ns", "digest", "paused", at=days_ago(30))
    stats = {t.name: t for t in history.table_stats()}
    assert {"schedule_executions", "schedule_events", "schedule_purged_totals"} <= set(stats)
    runs = stats["schedule_executions"]
    assert (runs.rows, runs.oldest) == (2, days_ago(500))
    assert runs.total_bytes > 0
    assert stats["schedule_events"].oldest == days_ago(30)
    assert stats["schedule_purged_totals"].rows == 0
    assert stats["schedule_purged_totals"].oldest is None
    assert "alembic_version" not in stats


def test_the_sweep_purges_a_bounded_number_of_batches_and_counts_them(history: History) -> None:
    for job in range(PURGE_BATCHES + 2):
        attempt(history, f"i{job}", RunOutcome.SUCCEEDED, days_ago(500 - job))
    attempt(history, "latest", RunOutcome.SUCCEEDED, days_ago(1))
    history.record_event("ns", "digest", "paused", at=days_ago(500))
    settings = load_settings(retention_batch_size=1, audit_retention_days=0)

    def purged_rows() -> float:
        labels = {"table": "schedule_executions"}
        return REGISTRY.get_sample_value("nocturne_purged_rows_total", labels) or 0.0

    counted = purged_rows()
    assert purge_expired(history, settings, NOW) is False  # a backlog: the next sweep goes on
    assert purged_rows() - counted == PURGE_BATCHES
    assert purge_expired(history, settings, NOW) is True  # two more, then a short batch
    assert purged_rows() - counted == PURGE_BATCHES + 2
    assert job_names(history) == ["digest-latest"]
    assert [e.kind for e in history.events("ns", "digest")] == ["paused"]  # 0: kept forever
    assert purge_expired(history, load_settings(), NOW) is True
    assert history.events("ns", "digest") == []
