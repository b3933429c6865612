"""Central budget reservations (``History.reserve``) against a real PostgreSQL: what each cap
leaves, replays, refusals recorded as BUDGET_EXCEEDED, retries sharing the per-run cap, the month
boundary in the schedule's zone, re-created schedules, overruns, and concurrent reservations that
never overspend."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from integration.concurrency import at_once, warm_histories
from nocturne_operator.runs.verdicts import reap
from nocturne_operator.storage import (
    Caps,
    ExecutionKey,
    GrantRecord,
    History,
    HistoryError,
    StatsQuery,
    month_start,
    upgrade,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
MONTH = month_start(T0, "UTC")
D = Decimal


def key(job: str, pod: str = "0", *, uid: str = "uid-news", name: str = "news") -> ExecutionKey:
    return ExecutionKey("ns", name, uid, f"{name}-{job}", f"job-{uid}-{job}", f"pod-{pod}", 0)


def reserve(
    history: History,
    job: str,
    pod: str = "0",
    *,
    caps: Caps,
    at: datetime = T0,
    uid: str = "uid-news",
    name: str = "news",
) -> GrantRecord:
    return history.reserve(
        key(job, pod, uid=uid, name=name),
        model="gpt-4o-mini",
        provider="openai",
        started_at=at,
        caps=caps,
    )


def progress(history: History, grant: GrantRecord, cost: str, reserved: str = "0") -> None:
    """A progress report of ``grant``'s attempt: ``cost`` so far, ``reserved`` for a call."""
    history.record_progress(
        grant.execution_id,
        cost_usd=D(cost),
        input_tokens=1,
        output_tokens=1,
        reserved_usd=D(reserved),
    )


def spend(
    history: History,
    grant: GrantRecord,
    cost: str | Decimal,
    status: RunOutcome = RunOutcome.SUCCEEDED,
    **extra: Any,
) -> RunOutcome:
    return history.finish(
        grant.execution_id,
        status=status,
        completed_at=T0 + timedelta(minutes=5),
        cost_usd=D(cost),
        input_tokens=10,
        output_tokens=10,
        **extra,
    )


def committed(history: History, uid: str = "uid-news", since: datetime | None = None) -> Decimal:
    """What the schedule's rows hold of its budget, computed apart from storage/runs.py."""
    with history.engine.connect() as conn:
        value = conn.execute(
            sa.text(
                """
                SELECT coalesce(sum(CASE WHEN status = 'RUNNING'
                                         THEN greatest(coalesce(granted_usd, cost_usd), cost_usd)
                                         ELSE cost_usd END), 0)
                FROM schedule_executions
                WHERE schedule_uid = :uid AND started_at >= :since
                """
            ),
            {"uid": uid, "since": since or datetime(1970, 1, 1, tzinfo=UTC)},
        ).scalar_one()
    return D(value)


# ---- basics -------------------------------------------------------------------------------------


def test_a_grant_is_what_the_caps_leave_and_the_attempt_is_recorded_running(
    history: History,
) -> None:
    grant = reserve(
        history, "a", caps=Caps(D("2.00"), total=D("60"), monthly=D(10), month_start=MONTH)
    )
    assert grant == GrantRecord(grant.execution_id, 0, D("2.00"), D(0), None, None, replay=False)
    row = history.get(grant.execution_id)
    assert row is not None
    assert (row.status, row.granted_usd, row.cost_usd, row.attempt) == (
        RunOutcome.RUNNING,
        D("2.00"),
        D(0),
        0,
    )
    assert (row.model, row.provider, row.started_at, row.schedule_uid) == (
        "gpt-4o-mini",
        "openai",
        T0,
        "uid-news",
    )
    assert history.running("uid-news") == [row]
    # The total and monthly caps bind when they leave less than the per-run cap.
    spend(history, grant, "1.50")
    assert reserve(history, "b", caps=Caps(D(2), total=D("2.25"))).limit == D("0.75")
    assert reserve(history, "c", caps=Caps(D(2), monthly=D("2.50"), month_start=MONTH)).limit == D(
        "0.25"
    )  # b's grant of 0.75 is in flight


def test_a_grant_is_rounded_down_to_the_micro_dollar(history: History) -> None:
    assert reserve(history, "a", caps=Caps(D("0.1234569"))).limit == D("0.123456")
    refused = reserve(history, "b", caps=Caps(D(1), total=D("0.1234565")))
    assert (refused.limit, refused.refused) == (D(0), "TotalBudgetReached")


def test_a_replay_returns_the_same_grant_and_changes_nothing(history: History) -> None:
    caps = Caps(D("1.00"), total=D("5"))
    first = reserve(history, "a", caps=caps)
    history.record_progress(first.execution_id, cost_usd=D("0.3"), input_tokens=1, output_tokens=1)
    # Even under other caps: the decision was made (a lost answer is retried).
    again = reserve(history, "a", caps=Caps(D("0.01")))
    assert again == GrantRecord(first.execution_id, 0, D("1.00"), D(0), None, None, replay=True)
    assert len(history.for_job(key("a").job_uid)) == 1
    row = history.get(first.execution_id)
    assert row is not None
    assert (row.status, row.cost_usd, row.granted_usd) == (RunOutcome.RUNNING, D("0.3"), D(1))

    refused = reserve(history, "b", caps=Caps(D(0)))
    replayed = reserve(history, "b", caps=Caps(D(9)))
    assert replayed == GrantRecord(
        refused.execution_id, 0, D(0), D(0), refused.refused, refused.message, replay=True
    )
    assert replayed.refused == "BudgetExhausted"


def test_a_replay_of_another_schedules_attempt_is_refused(history: History) -> None:
    reserve(history, "a", caps=Caps(D(1)))
    other = ExecutionKey("ns", "news", "uid-other", "news-a", key("a").job_uid, "pod-0", 0)
    with pytest.raises(
        HistoryError, match=r"already belongs to execution \d+ of schedule UID uid-news"
    ):
        history.reserve(other, model="m", provider="offline", started_at=T0, caps=Caps(D(1)))
    new_pod = ExecutionKey("ns", "news", "uid-other", "news-a", key("a").job_uid, "pod-9", 0)
    with pytest.raises(HistoryError, match="another schedule UID"):
        history.reserve(new_pod, model="m", provider="offline", started_at=T0, caps=Caps(D(1)))


def test_caps_are_checked() -> None:
    with pytest.raises(ValueError, match=r"Caps\.month_start: required"):
        Caps(D(1), monthly=D(5))
    with pytest.raises(ValueError, match="timezone-aware"):
        Caps(D(1), monthly=D(5), month_start=datetime(2026, 11, 1))  # noqa: DTZ001
    with pytest.raises(TypeError, match=r"Caps\.total: 1\.5 must be a Decimal"):
        Caps(D(1), total=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Caps\.per_run: -1 must be a finite amount >= 0"):
        Caps(D(-1))
    with pytest.raises(ValueError, match=r"Caps\.monthly: NaN"):
        Caps(D(1), monthly=D("NaN"), month_start=MONTH)


# ---- refusals -----------------------------------------------------------------------------------


def refusal_row(history: History, grant: GrantRecord) -> tuple[Any, ...]:
    row = history.get(grant.execution_id)
    assert row is not None
    return (
        row.status,
        row.completed_at,
        row.cost_usd,
        row.granted_usd,
        row.error,
        row.metadata,
    )


def test_the_total_cap_counts_what_running_jobs_hold(history: History) -> None:
    caps = Caps(D("0.50"), total=D("1.00"))
    spend(history, reserve(history, "a", caps=caps), "0.48")
    spend(history, reserve(history, "b", caps=caps), "0.50")
    held = reserve(history, "c", caps=caps)  # running: its 0.02 is reserved, not spent
    assert held.limit == D("0.02")
    refused = reserve(history, "d", caps=caps)
    message = "maxTotalUSD 1.00 reached: 0.98 spent and 0.02 reserved by running Jobs"
    assert refused == GrantRecord(
        refused.execution_id, 0, D(0), D(0), "TotalBudgetReached", message, replay=False
    )
    assert refusal_row(history, refused) == (
        RunOutcome.BUDGET_EXCEEDED,
        T0,
        D(0),
        D(0),
        message,
        {"refused": "TotalBudgetReached"},
    )
    # Refused attempts hold nothing; the running one spends less than it was granted.
    spend(history, held, "0.01")
    assert reserve(history, "e", caps=caps).limit == D("0.01")


def test_the_monthly_cap_counts_the_month_in_the_schedules_zone(history: History) -> None:
    """Tokyo's November starts at 2026-10-31T15:00Z; the caller says when the month started."""
    tokyo = month_start(datetime(2026, 11, 20, tzinfo=UTC), "Asia/Tokyo")
    assert tokyo == datetime(2026, 10, 31, 15, 0, tzinfo=UTC)
    caps = Caps(D(5), monthly=D("1.00"), month_start=tokyo)
    october = datetime(2026, 10, 31, 14, 59, tzinfo=UTC)  # 23:59 JST on 31 October
    november = datetime(2026, 10, 31, 15, 0, tzinfo=UTC)  # 00:00 JST on 1 November
    spend(history, reserve(history, "oct", caps=Caps(D(5)), at=october), "0.90")
    spend(history, reserve(history, "nov", caps=caps, at=november), "0.30")
    grant = reserve(history, "now", caps=caps, at=T0)
    assert grant.limit == D("0.70")
    refused = reserve(history, "late", caps=caps, at=T0)
    assert (refused.refused, refused.message) == (
        "MonthlyBudgetReached",
        "maxMonthlyUSD 1.00 reached for the month from 2026-11-01T00:00:00+09:00: "
        "0.30 spent and 0.70 reserved by running Jobs",
    )
    assert committed(history, since=tokyo) == D("1.00")
    # In UTC both runs of 31 October fall in October: the caller's zone decides.
    utc = Caps(D(5), monthly=D("1.00"), month_start=month_start(T0, "UTC"))
    assert reserve(history, "utc", caps=utc).limit == D("0.30")


def test_the_per_run_cap_is_shared_by_the_attempts_of_one_job(history: History) -> None:
    caps = Caps(D("1.00"), total=D(10))
    first = reserve(history, "a", "p0", caps=caps)
    assert (first.attempt, first.limit, first.spent_before) == (0, D(1), D(0))
    # While the first attempt runs, its whole grant counts against the Job.
    early = reserve(history, "a", "p1", caps=caps)
    assert (early.attempt, early.limit, early.spent_before, early.refused) == (
        1,
        D(0),
        D(1),
        "BudgetExhausted",
    )
    assert early.message == (
        "maxPerRunUSD 1.00 reached: 0.00 spent and 1.00 reserved by the earlier attempts of "
        "Job news-a"
    )
    spend(history, first, "0.60", RunOutcome.FAILED)
    second = reserve(history, "a", "p2", caps=caps)
    assert (second.attempt, second.limit, second.spent_before) == (2, D("0.40"), D("0.60"))
    spend(history, second, "0.40", RunOutcome.FAILED)
    third = reserve(history, "a", "p3", caps=caps)
    assert (third.attempt, third.limit, third.refused) == (3, D(0), "BudgetExhausted")
    # Another Job has its own per-run cap.
    assert reserve(history, "b", caps=caps).limit == D(1)
    # A replay of the second attempt still tells what was spent before it.
    assert reserve(history, "a", "p2", caps=caps).spent_before == D("0.60")  # p1 was refused


def test_the_first_cap_with_nothing_left_names_the_refusal(history: History) -> None:
    spend(history, reserve(history, "a", caps=Caps(D(1))), "1.00")
    everything = Caps(D(1), total=D(1), monthly=D(1), month_start=MONTH)
    assert reserve(history, "a", "p1", caps=everything).refused == "BudgetExhausted"
    assert reserve(history, "b", caps=everything).refused == "TotalBudgetReached"
    assert reserve(history, "c", caps=Caps(D(1), monthly=D(1), month_start=MONTH)).refused == (
        "MonthlyBudgetReached"
    )


def test_a_recreated_schedule_starts_clean_but_history_lists_every_incarnation(
    history: History,
) -> None:
    caps = Caps(D(1), total=D(1))
    spend(history, reserve(history, "a", caps=caps, uid="uid-old"), "1.00", RunOutcome.FAILED)
    assert reserve(history, "b", caps=caps, uid="uid-old").refused == "TotalBudgetReached"
    fresh = reserve(history, "c", caps=caps, uid="uid-new", at=T0 + timedelta(hours=1))
    assert (fresh.limit, fresh.refused) == (D(1), None)
    spend(history, fresh, "0.25")

    listed = history.runs("ns", "news")
    assert [(r.schedule_uid, r.status) for r in listed] == [
        ("uid-new", RunOutcome.SUCCEEDED),
        ("uid-old", RunOutcome.BUDGET_EXCEEDED),
        ("uid-old", RunOutcome.FAILED),
    ]
    new = history.run_stats([StatsQuery("uid-new", month_start=MONTH)])["uid-new"]
    assert (new.total_cost, new.succeeded, new.failed, new.consecutive_failures) == (
        D("0.25"),
        1,
        0,
        0,
    )
    assert new.month_cost == D("0.25")
    assert new.last_run is not None
    assert new.last_run.schedule_uid == "uid-new"
    old = history.run_stats([StatsQuery("uid-old")])["uid-old"]
    assert (old.total_cost, old.succeeded, old.failed) == (D(1), 0, 2)
    assert history.total_cost("ns", "news", schedule_uid="uid-old") == D(1)
    assert history.total_cost("ns", "news") == D("1.25")


# ---- costs above the grant ---------------------------------------------------------------------


def test_a_cost_above_the_grant_is_recorded_flagged_and_counted(
    history: History, caplog: pytest.LogCaptureFixture
) -> None:
    caps = Caps(D(1), total=D("0.30"))
    grant = reserve(history, "a", caps=caps)
    assert grant.limit == D("0.30")
    with caplog.at_level(logging.WARNING, "nocturne_operator.storage.runs"):
        history.record_progress(
            grant.execution_id, cost_usd=D("0.35"), input_tokens=1, output_tokens=1
        )
    assert "cost 0.35 is above the attempt's grant 0.30" in caplog.text
    row = history.get(grant.execution_id)
    assert row is not None
    assert (row.cost_usd, row.metadata) == (D("0.35"), {"overrun": True})
    # The truth counts: nothing is left for anyone.
    assert reserve(history, "b", caps=caps).message == (
        "maxTotalUSD 0.30 reached: 0.35 spent and 0.00 reserved by running Jobs"
    )
    # finish keeps the flag next to the caller's metadata; a lower replayed cost lowers nothing.
    spend(history, grant, "0.36", metadata={"recordedBy": "runner"})
    spend(history, grant, "0.10", RunOutcome.FAILED)
    row = history.get(grant.execution_id)
    assert row is not None
    assert (row.status, row.cost_usd, row.metadata) == (
        RunOutcome.SUCCEEDED,
        D("0.36"),
        {"recordedBy": "runner", "overrun": True},
    )


def test_a_cost_reported_on_a_refused_attempt_is_recorded_and_flagged(history: History) -> None:
    refused = reserve(history, "a", caps=Caps(D(0)))
    assert spend(history, refused, "0.02", RunOutcome.FAILED) is (RunOutcome.BUDGET_EXCEEDED)
    row = history.get(refused.execution_id)
    assert row is not None
    assert (row.cost_usd, row.metadata) == (
        D("0.02"),
        {"refused": "BudgetExhausted", "overrun": True},
    )


def test_within_the_grant_nothing_is_flagged(history: History) -> None:
    grant = reserve(history, "a", caps=Caps(D("0.30")))
    history.record_progress(grant.execution_id, cost_usd=D("0.30"), input_tokens=1, output_tokens=1)
    spend(history, grant, "0.30", metadata={"k": 1})
    row = history.get(grant.execution_id)
    assert row is not None
    assert row.metadata == {"k": 1}


# ---- rows without a grant ----------------------------------------------------------------------


def test_rows_from_before_grants_count_at_their_cost(postgres: PostgresServer) -> None:
    url = postgres.fresh_schema(f"grants_{uuid.uuid4().hex[:8]}")
    upgrade(url, "0002")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, completed_at, cost_usd, model, provider)
                VALUES ('ns', 'news', 'uid-news', 'news-x', 'job-x', 'pod-x', 0,
                        'SUCCEEDED', :t, :t, 0.40, 'm', 'openai'),
                       ('ns', 'news', 'uid-news', 'news-y', 'job-y', 'pod-y', 0,
                        'RUNNING', :t, NULL, 0.10, 'm', 'openai')
                """
            ),
            {"t": T0 - timedelta(hours=1)},
        )
    engine.dispose()
    upgrade(url)
    with History.connect(url) as history:
        assert [r.granted_usd for r in history.runs("ns", "news")] == [None, None]
        assert reserve(history, "z", caps=Caps(D(1), total=D(1))).limit == D("0.50")
        # The operator writes a row for an attempt that never reserved: no grant, its cost.
        started = history.start(key("w"), model="m", provider="offline", started_at=T0)
        history.record_progress(started, cost_usd=D("0.05"), input_tokens=1, output_tokens=1)
        row = history.get(started)
        assert row is not None
        assert (row.granted_usd, row.metadata) == (None, {})
        assert committed(history) == D("1.05")
        # Replaying a reservation for it returns what it was granted: nothing.
        replay = reserve(history, "w", caps=Caps(D(1)))
        assert (replay.execution_id, replay.limit, replay.refused, replay.replay) == (
            started,
            D(0),
            None,
            True,
        )


def test_the_reaper_turns_a_stale_grant_into_the_cost_it_recorded(history: History) -> None:
    caps = Caps(D(1), total=D(1))
    grant = reserve(history, "a", caps=caps)
    history.record_progress(grant.execution_id, cost_usd=D("0.2"), input_tokens=1, output_tokens=1)
    assert reserve(history, "b", caps=caps).refused == "TotalBudgetReached"
    (row,) = history.running("uid-news")
    done = reap([row], jobs=[], pods=[], history=history, now=T0 + timedelta(hours=2))
    assert [status for _, status in done] == [RunOutcome.CANCELLED]
    assert committed(history) == D("0.2")
    assert reserve(history, "c", caps=caps).limit == D("0.8")


def test_an_attempt_killed_during_a_call_is_charged_the_call_in_flight(history: History) -> None:
    """The fence: the runner reports what a call may cost before making it; an attempt that
    ends without its final report (SIGKILL during the call) is charged that too, at most its
    grant, so later grants are not computed from a cost that leaves the call out."""
    caps = Caps(D(1), total=D(1))
    grant = reserve(history, "a", caps=caps)
    progress(history, grant, "0.2", reserved="0.3")
    (row,) = history.running("uid-news")
    reap([row], jobs=[], pods=[], history=history, now=T0 + timedelta(hours=2))
    assert committed(history) == D("0.5")
    assert reserve(history, "b", caps=caps).limit == D("0.5")


def test_a_late_report_from_before_a_call_does_not_bring_its_reservation_back(
    history: History,
) -> None:
    caps = Caps(D(1), total=D(1))
    grant = reserve(history, "a", caps=caps)
    progress(history, grant, "0.2", reserved="0.3")  # before a call
    progress(history, grant, "0.25")  # after it
    progress(history, grant, "0.2", reserved="0.3")  # the first, delivered late by a retry
    (row,) = history.running("uid-news")
    reap([row], jobs=[], pods=[], history=history, now=T0 + timedelta(hours=2))
    assert committed(history) == D("0.25")


def test_the_charge_in_flight_never_passes_the_grant_and_a_final_report_settles_it(
    history: History,
) -> None:
    caps = Caps(D("0.4"), total=D(10))
    killed = reserve(history, "a", caps=caps)
    progress(history, killed, "0.3", reserved="1")
    spend(history, killed, "0.3", RunOutcome.FAILED, in_flight=True)
    reported = reserve(history, "b", caps=caps)
    progress(history, reported, "0.1", reserved="0.2")
    # The runner's own final report is the truth: what it settled, nothing in flight.
    spend(history, reported, "0.15")
    with history.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT job_uid, cost_usd, reserved_usd FROM schedule_executions ORDER BY id")
        ).all()
    assert [(r.job_uid, D(r.cost_usd), D(r.reserved_usd)) for r in rows] == [
        ("job-uid-news-a", D("0.4"), D(0)),
        ("job-uid-news-b", D("0.15"), D(0)),
    ]


# ---- concurrency -------------------------------------------------------------------------------


def test_concurrent_jobs_never_overspend_the_total_and_monthly_caps(url: str) -> None:
    """The issue's failure: two Jobs each took the last 0.05 of 1.00. Now 12 Jobs reserve at
    once on their own connections, each spends its whole grant, and the sums stay within."""
    caps = Caps(D("0.30"), total=D("1.00"), monthly=D("0.85"), month_start=MONTH)
    with History.connect(url) as setup:
        earlier = reserve(setup, "before", caps=Caps(D(1)), at=MONTH - timedelta(days=1))
        spend(setup, earlier, "0.10")  # counts for the total, not for the month
    threads = 12

    with ExitStack() as stack:
        histories = warm_histories(url, threads, stack)

        def job(n: int) -> GrantRecord:
            grant = reserve(histories[n], f"j{n}", caps=caps)
            spend(histories[n], grant, grant.limit)
            return grant

        grants = at_once(threads, job)
    assert sorted(g.limit for g in grants if g.limit) == [D("0.25"), D("0.30"), D("0.30")]
    assert {g.refused for g in grants if not g.limit} == {"MonthlyBudgetReached"}
    with History.connect(url) as history:
        assert history.total_cost("ns", "news", schedule_uid="uid-news") == D("0.95")
        assert committed(history, since=MONTH) == D("0.85")
        stats = history.run_stats([StatsQuery("uid-news", month_start=MONTH)])["uid-news"]
        assert (stats.total_cost, stats.month_cost) == (D("0.95"), D("0.85"))
        assert stats.failed == threads - 3


# ---- property: any interleaving stays within the caps -------------------------------------------

PROFILE = settings(max_examples=60, derandomize=True, database=None, deadline=None)
FINAL = [s for s in RunOutcome if s is not RunOutcome.RUNNING]
BEFORE, DURING = MONTH - timedelta(hours=1), MONTH + timedelta(hours=1)
ZERO = D(0)

cents = st.integers(0, 150).map(lambda c: D(c) / 100)
caps_strategy = st.builds(
    Caps,
    per_run=cents,
    total=st.none() | cents,
    monthly=st.none() | cents,
    month_start=st.just(MONTH),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 3), st.sampled_from([BEFORE, DURING])),
        st.tuples(st.just("replay"), st.integers(0, 99)),
        st.tuples(st.just("progress"), st.integers(0, 99), st.integers(0, 1000)),
        st.tuples(
            st.just("finish"), st.integers(0, 99), st.integers(0, 1000), st.sampled_from(FINAL)
        ),
        st.tuples(st.just("reap"), st.integers(0, 99)),
    ),
    min_size=1,
    max_size=25,
)


@dataclass
class Attempt:
    """What the test knows of one reserved attempt."""

    key: ExecutionKey
    at: datetime
    grant: GrantRecord
    cost: Decimal = ZERO
    final: bool = False

    @property
    def held(self) -> Decimal:
        return self.cost if self.final else max(self.grant.limit, self.cost)


@pytest.fixture(scope="module")
def shared(postgres: PostgresServer) -> Iterator[History]:
    """One schema for every example; each example is a schedule UID of its own."""
    url = postgres.fresh_schema(f"grants_prop_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    with History.connect(url) as store:
        yield store


def sums(history: History, uid: str) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal]:
    """Committed and final cost of the schedule (ever, this month) and the most any Job holds."""
    with history.engine.connect() as conn:
        row = conn.execute(
            sa.text(
                """
                WITH held AS (
                    SELECT job_uid, started_at >= :month AS this_month,
                           status <> 'RUNNING' AS final, cost_usd,
                           CASE WHEN status = 'RUNNING'
                                THEN greatest(coalesce(granted_usd, cost_usd), cost_usd)
                                ELSE cost_usd END AS committed
                    FROM schedule_executions WHERE schedule_uid = :uid
                ), per_job AS (SELECT sum(committed) AS committed FROM held GROUP BY job_uid)
                SELECT coalesce(sum(committed), 0),
                       coalesce(sum(committed) FILTER (WHERE this_month), 0),
                       coalesce(sum(cost_usd) FILTER (WHERE final), 0),
                       coalesce(sum(cost_usd) FILTER (WHERE final AND this_month), 0),
                       (SELECT coalesce(max(committed), 0) FROM per_job)
                FROM held
                """
            ),
            {"uid": uid, "month": MONTH},
        ).one()
    return (D(row[0]), D(row[1]), D(row[2]), D(row[3]), D(row[4]))


def expected_limit(caps: Caps, attempts: list[Attempt], job_uid: str) -> Decimal:
    """The grant computed from what the test knows, independently of storage/runs.py."""
    left = [caps.per_run - sum((a.held for a in attempts if a.key.job_uid == job_uid), D(0))]
    if caps.total is not None:
        left.append(caps.total - sum((a.held for a in attempts), D(0)))
    if caps.monthly is not None:
        left.append(caps.monthly - sum((a.held for a in attempts if a.at >= MONTH), D(0)))
    return max(D(0), min(left)).quantize(D("0.000001"), rounding=ROUND_FLOOR)


@PROFILE
@given(caps=caps_strategy, jobs=st.integers(2, 4), script=steps)
def test_any_interleaving_of_reservations_and_reports_stays_within_every_cap(
    shared: History, caps: Caps, jobs: int, script: list[tuple[Any, ...]]
) -> None:
    uid = f"uid-{uuid.uuid4().hex}"
    attempts: list[Attempt] = []
    for step in script:
        kind, ref = step[0], step[1]
        if kind == "reserve":
            job = ref % jobs
            pods = [a for a in attempts if a.key.job_uid == f"job-{uid}-{job}"]
            if len(pods) > 2:  # backoffLimit 2: at most three attempts per Job
                continue
            k = key(str(job), f"{uid}-{job}-{len(pods)}", uid=uid)
            want = expected_limit(caps, attempts, k.job_uid)
            held_before = sum((a.held for a in pods), D(0))
            grant = shared.reserve(k, model="m", provider="offline", started_at=step[2], caps=caps)
            assert (grant.limit, grant.attempt, grant.spent_before) == (
                want,
                len(pods),
                held_before,
            )
            assert (grant.refused is None) == (want > 0)
            attempts.append(Attempt(k, step[2], grant, final=grant.refused is not None))
            continue
        if not attempts:
            continue
        attempt = attempts[ref % len(attempts)]
        run_id = attempt.grant.execution_id
        if kind == "replay":
            again = shared.reserve(
                attempt.key, model="m", provider="offline", started_at=attempt.at, caps=caps
            )
            assert again.replay
            assert (again.execution_id, again.limit, again.refused) == (
                run_id,
                attempt.grant.limit,
                attempt.grant.refused,
            )
        elif kind == "progress":
            share = (attempt.grant.limit * step[2] / 1000).quantize(D("0.000001"), ROUND_FLOOR)
            shared.record_progress(run_id, cost_usd=share, input_tokens=1, output_tokens=1)
            if not attempt.final:
                attempt.cost = max(attempt.cost, share)
        elif kind == "finish":
            share = (attempt.grant.limit * step[2] / 1000).quantize(D("0.000001"), ROUND_FLOOR)
            shared.finish(
                run_id,
                status=step[3],
                completed_at=attempt.at + timedelta(minutes=1),
                cost_usd=share,
                input_tokens=1,
                output_tokens=1,
            )
            attempt.cost, attempt.final = max(attempt.cost, share), True
        elif kind == "reap" and not attempt.final:
            (row,) = [r for r in shared.running(uid) if r.id == run_id]
            reap([row], jobs=[], pods=[], history=shared, now=attempt.at + timedelta(hours=1))
            attempt.final = True

        ever, month, final_ever, final_month, most_by_a_job = sums(shared, uid)
        assert ever == sum((a.held for a in attempts), D(0))
        assert most_by_a_job <= caps.per_run
        for cap, held, spent in (
            (caps.total, ever, final_ever),
            (caps.monthly, month, final_month),
        ):
            if cap is not None:
                assert spent <= held <= cap
