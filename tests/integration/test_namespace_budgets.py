"""Namespace budgets (an AgentSchedulePolicy's monthly cap on a whole namespace) against a real
PostgreSQL: the rows kept in step with the policies, and ``reserve()`` holding every schedule of
the namespace together within the cap, concurrent Jobs of different schedules included."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from agent_runner.contract import RunOutcome
from integration.concurrency import at_once, warm_histories
from nocturne_operator.storage import (
    Caps,
    ExecutionKey,
    GrantRecord,
    History,
    NamespaceBudgetRow,
    month_start,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
D = Decimal
CAPS = Caps(D("1.00"))


def reserve(
    history: History, schedule: str, job: str, *, namespace: str = "team", at: datetime = T0
) -> GrantRecord:
    key = ExecutionKey(
        namespace, schedule, f"uid-{namespace}-{schedule}", f"{schedule}-{job}",
        f"job-{namespace}-{schedule}-{job}", "pod-0", 0,
    )  # fmt: skip
    return history.reserve(key, model="gpt-4o-mini", provider="openai", started_at=at, caps=CAPS)


def spend(history: History, grant: GrantRecord, cost: str | Decimal) -> None:
    history.finish(
        grant.execution_id,
        status=RunOutcome.SUCCEEDED,
        completed_at=T0 + timedelta(minutes=5),
        cost_usd=D(cost),
        input_tokens=1,
        output_tokens=1,
    )


def budget(cap: str, zone: str = "UTC", policy: str = "team") -> NamespaceBudgetRow:
    return NamespaceBudgetRow(D(cap), zone, policy)


def test_the_rows_follow_the_policies_and_a_second_sync_writes_nothing(history: History) -> None:
    assert history.sync_namespace_budgets({"team": budget("5"), "ops": budget("2")}) == 2
    assert history.sync_namespace_budgets({"team": budget("5"), "ops": budget("2")}) == 0
    assert history.sync_namespace_budgets({"team": budget("6", "Asia/Tokyo")}) == 2
    assert history.namespace_budgets() == {"team": budget("6", "Asia/Tokyo")}


def test_an_operator_serving_some_namespaces_leaves_the_others_rows_alone(
    history: History,
) -> None:
    history.sync_namespace_budgets({"solo-a": budget("1"), "team": budget("5")})
    history.sync_namespace_budgets({}, lambda namespace: not namespace.startswith("solo-"))
    assert history.namespace_budgets() == {"solo-a": budget("1")}


@pytest.mark.parametrize(
    ("cap", "zone", "error"),
    [
        ("-1", "UTC", ValueError),
        ("NaN", "UTC", ValueError),
        ("5", "Mars/Olympus", ValueError),
        (0.5, "UTC", TypeError),
    ],
)
def test_a_budget_row_refuses_bad_values(cap: object, zone: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        NamespaceBudgetRow(D(cap) if isinstance(cap, str) else cap, zone, "p")  # type: ignore[arg-type]


def test_grants_of_every_schedule_in_the_namespace_share_the_monthly_cap(history: History) -> None:
    history.sync_namespace_budgets({"team": budget("1.50")})
    first = reserve(history, "news", "a")
    assert first.limit == D("1.00")  # the per-run cap is the smaller
    second = reserve(history, "watch", "a")
    assert second.limit == D("0.50")  # what the namespace has left while the first runs
    third = reserve(history, "digest", "a")
    assert (third.limit, third.refused) == (D(0), "NamespaceBudgetReached")
    assert third.message is not None
    assert "the namespace's maxMonthlyUSD 1.50 reached" in third.message
    assert 'AgentSchedulePolicy "team"' in third.message
    assert "running Jobs in namespace team" in third.message
    spend(history, first, "0.20")  # the unspent grant comes back
    fourth = reserve(history, "digest", "b")
    assert fourth.limit == D("0.80")
    # Another namespace, and this one next month, are not touched by it.
    assert reserve(history, "news", "a", namespace="other").limit == D("1.00")
    next_month = month_start(T0, "UTC") + timedelta(days=31)
    assert reserve(history, "news", "next", at=next_month).limit == D("1.00")


def test_the_month_is_the_budgets_zone(history: History) -> None:
    history.sync_namespace_budgets({"team": budget("1.00", "Pacific/Kiritimati")})
    # Kiritimati is UTC+14: 2026-11-30 08:00 UTC is 22:00 there, 10:00 UTC its new month.
    late = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    spend(history, reserve(history, "news", "a", at=late), "1.00")
    assert reserve(history, "news", "b", at=late + timedelta(hours=1)).refused == (
        "NamespaceBudgetReached"
    )
    assert reserve(history, "news", "c", at=late + timedelta(hours=2)).limit == D(1)
    since = month_start(late, "Pacific/Kiritimati")
    assert history.namespace_month_cost("team", since) == D("1.00")


def test_without_a_row_the_namespace_is_not_capped(history: History) -> None:
    history.sync_namespace_budgets({"team": budget("0")})
    assert reserve(history, "news", "a").refused == "NamespaceBudgetReached"
    history.sync_namespace_budgets({})
    assert reserve(history, "news", "b").limit == D("1.00")


def test_concurrent_jobs_of_many_schedules_never_overspend_the_namespace(url: str) -> None:
    """Twelve Jobs of twelve schedules reserve at once on their own connections (each under
    its own schedule's lock): the namespace's lock makes them see each other."""
    with History.connect(url) as setup:
        setup.sync_namespace_budgets({"team": budget("2.50")})

    with ExitStack() as stack:
        histories = warm_histories(url, 12, stack)

        def job(n: int) -> GrantRecord:
            grant = reserve(histories[n], f"s{n}", "a")
            spend(histories[n], grant, grant.limit)
            return grant

        grants = at_once(12, job)
    assert sorted(g.limit for g in grants if g.limit) == [D("0.50"), D("1.00"), D("1.00")]
    assert {g.refused for g in grants if not g.limit} == {"NamespaceBudgetReached"}
    with History.connect(url) as history:
        assert history.namespace_month_cost("team", month_start(T0, "UTC")) == D("2.50")


def test_a_policys_per_run_cap_replaces_the_clusters_at_grant_time(history: History) -> None:
    """The run API passes the cluster's cap as per_run and the schedule's own ask: a namespace
    row with a per-run cap decides between them, relaxing or tightening."""
    key = ExecutionKey("team", "news", "uid-n", "news-1", "job-n-1", "pod-0", 0)

    def granted(job: str, per_run: str, asked: str) -> Decimal:
        caps = Caps(D(per_run), asked=D(asked))
        return history.reserve(
            replace(key, job_name=f"news-{job}", job_uid=f"job-n-{job}"),
            model="gpt-4o-mini",
            provider="openai",
            started_at=T0,
            caps=caps,
        ).limit

    # No row: the cluster's cap (10) stands under the schedule's ask (20).
    assert granted("a", "10", "20") == D(10)
    history.sync_namespace_budgets({"team": NamespaceBudgetRow(None, max_per_run_usd=D(50))})
    assert granted("b", "10", "20") == D(20)  # relaxed: the schedule's own 20
    history.sync_namespace_budgets({"team": NamespaceBudgetRow(None, max_per_run_usd=D(2))})
    assert granted("c", "10", "20") == D(2)  # tightened, whatever the Job's snapshot asks


def test_a_row_needs_a_cap_and_a_per_run_cap_above_zero() -> None:
    with pytest.raises(ValueError, match="needs a monthly or a per-run cap"):
        NamespaceBudgetRow(None)
    with pytest.raises(ValueError, match="must be greater than 0"):
        NamespaceBudgetRow(None, max_per_run_usd=D(0))
    with pytest.raises(ValueError, match="must be from 0 to"):
        NamespaceBudgetRow(D("100000000"))
