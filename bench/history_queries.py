"""Measure the history queries the operator and CLI run, on a large table.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/history_queries.py [rows] [repeats]
Starts a private PostgreSQL, loads `rows` executions (default 200k: 40 schedules in 4 namespaces,
one run an hour each), VACUUM ANALYZE, then times each History call (median and p95 of `repeats`,
end to end through the public API). The baseline measured in the same run is the same call on a
connection with index and bitmap scans disabled (so every query reads the table sequentially);
the ratio shows what the indexes buy. Also times one run's writes as the run API makes them
(reserve on a schedule with its whole history, 3 progress reports, finish), then the same with a
namespace budget (an AgentSchedulePolicy's monthly cap: every grant also sums the namespace's
month, MONTH_ROWS runs of 1,000 schedules) against it without, in the same run.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa

from harness.postgres import running_postgres
from nocturne_operator.storage import Caps, ExecutionKey, History, NamespaceBudgetRow, upgrade

SCHEDULES = 40
NAMESPACES = 4
T0 = datetime(2025, 1, 1, tzinfo=UTC)
NO_INDEXES = "-c enable_indexscan=off -c enable_indexonlyscan=off -c enable_bitmapscan=off"
# Runs of this month in the namespace with a budget: 1,000 schedules, one run a day each.
MONTH_ROWS = 30_000


def _insert(history: History, insert: str, params: dict[str, object]) -> None:
    """Run one INSERT ... SELECT, then VACUUM ANALYZE the table."""
    with history.engine.begin() as conn:
        # The test server commits asynchronously; VACUUM sets the visibility map only for
        # flushed commits (index-only scans need it).
        conn.execute(sa.text("SET LOCAL synchronous_commit = on"))
        conn.execute(sa.text(insert), params)
    with history.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE schedule_executions"))


def load(history: History, rows: int) -> None:
    _insert(
        history,
        """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, completed_at, cost_usd, input_tokens, output_tokens,
                     model, provider, output)
                SELECT 'ns-' || (g % :namespaces), 'sched-' || (g % :schedules),
                       'suid-' || (g % :schedules), 'job-' || g, 'juid-' || (g / 2),
                       'puid-' || g, g % 2,
                       CASE WHEN g % 11 = 0 THEN 'FAILED' WHEN g % 97 = 0 THEN 'TIMED_OUT'
                            ELSE 'SUCCEEDED' END,
                       :t0 + (g / :schedules) * interval '1 hour',
                       :t0 + (g / :schedules) * interval '1 hour' + interval '2 minutes',
                       (g % 997) / 1000.0, 2000 + g % 1000, 300 + g % 100,
                       'gpt-4o-mini', 'openai', repeat('digest line ', 40)
                FROM generate_series(1, :rows) AS g
                """,
        {"namespaces": NAMESPACES, "schedules": SCHEDULES, "rows": rows, "t0": T0},
    )


def load_month(history: History, rows: int) -> None:
    """``rows`` finished runs of this month in ns-budget (1,000 schedules)."""
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    _insert(
        history,
        """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, completed_at, cost_usd, input_tokens, output_tokens,
                     model, provider)
                SELECT 'ns-budget', 'm-' || (g % 1000), 'msuid-' || (g % 1000), 'mjob-' || g,
                       'mjuid-' || g, 'mpuid-' || g, 0, 'SUCCEEDED',
                       :start + (g % 600) * interval '1 minute',
                       :start + (g % 600) * interval '1 minute' + interval '2 minutes',
                       0.001, 100, 10, 'gpt-4o-mini', 'openai'
                FROM generate_series(1, :rows) AS g
                """,
        {"rows": rows, "start": start},
    )


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and p95 wall time in milliseconds (after 3 warm-up calls)."""
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def cases(history: History) -> list[tuple[str, Callable[[], object]]]:
    deep = history.runs("ns-3", "sched-7", limit=1000)[-1].id
    last = T0 + timedelta(hours=5000 * 0.9)
    return [
        ("runs: first page (50)", lambda: history.runs("ns-3", "sched-7", limit=50)),
        (
            "runs: page after 1000 rows",
            lambda: history.runs("ns-3", "sched-7", limit=50, before_id=deep),
        ),
        (
            "runs: last SUCCEEDED",
            lambda: history.runs("ns-1", "sched-9", status="SUCCEEDED", limit=1),
        ),
        (
            "runs: FAILED in a 7-day window",
            lambda: history.runs(
                "ns-1", "sched-9", since=last, until=last + timedelta(days=7), status="FAILED"
            ),
        ),
        (
            "cost: by day, 30 days, Asia/Tokyo",
            lambda: history.cost(
                "ns-2", "sched-2", since=last, until=last + timedelta(days=30), tz="Asia/Tokyo"
            ),
        ),
        (
            "cost: by month, all time, New York",
            lambda: history.cost("ns-2", "sched-2", by="month", tz="America/New_York"),
        ),
        ("total cost, all time", lambda: history.total_cost("ns-0", "sched-0")),
        (
            "total cost, one incarnation (UID)",
            lambda: history.total_cost("ns-0", "sched-0", schedule_uid="suid-0"),
        ),
        ("spent_for_job (retries)", lambda: history.spent_for_job("juid-4321")),
    ]


def write_path(history: History, runs: int, namespace: str = "ns-0", tag: str = "w") -> float:
    """Median milliseconds for one run's writes: reserve (summing the schedule's committed spend
    under its lock, ever and this month; and the namespace's month when it has a budget),
    3 progress updates, finish."""
    now = datetime.now(UTC)
    caps = Caps(
        Decimal(1),
        total=Decimal(10**7),
        monthly=Decimal(10**6),
        month_start=now.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
    )
    samples = []
    for i in range(runs):
        key = ExecutionKey(
            namespace, "sched-0", "suid-0", f"job-{i}", f"{tag}-juid-{i}", f"{tag}-pod-{i}", 0
        )
        t0 = time.perf_counter()
        execution_id = history.reserve(
            key, model="gpt-4o-mini", provider="openai", started_at=datetime.now(UTC), caps=caps
        ).execution_id
        for step in range(1, 4):
            history.record_progress(
                execution_id,
                cost_usd=Decimal(step) / 100,
                input_tokens=1000 * step,
                output_tokens=100 * step,
            )
        history.finish(
            execution_id,
            status="SUCCEEDED",
            completed_at=datetime.now(UTC),
            cost_usd=Decimal("0.03"),
            input_tokens=3000,
            output_tokens=300,
            output="digest " * 200,
        )
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main(rows: int, repeats: int) -> None:
    with running_postgres() as server:
        upgrade(server.url)
        no_index_url = (
            sa.make_url(server.url)
            .update_query_dict({"options": NO_INDEXES})
            .render_as_string(hide_password=False)
        )
        with History.connect(server.url) as history, History.connect(no_index_url) as baseline:
            t0 = time.perf_counter()
            load(history, rows)
            print(f"rows: {rows} ({SCHEDULES} schedules, {rows // SCHEDULES} runs each)")
            print(f"load + VACUUM ANALYZE: {time.perf_counter() - t0:.1f} s; repeats: {repeats}")
            print(f"{'query':<38}{'indexed':>18}{'baseline (seq)':>22}{'ratio':>9}")
            for (name, call), (_, slow) in zip(cases(history), cases(baseline), strict=True):
                median, p95 = timed(call, repeats)
                base_median, base_p95 = timed(slow, repeats)
                print(
                    f"{name:<38}{median:8.2f} ms p95 {p95:5.2f}"
                    f"{base_median:11.2f} ms p95 {base_p95:6.2f}{base_median / median:8.0f}x"
                )
            per_run = write_path(history, 200)
            print(f"run write path (reserve + 3 progress + finish): {per_run:.2f} ms per run")
            load_month(history, MONTH_ROWS)
            unbudgeted = write_path(history, 200, "ns-budget", "u")
            history.sync_namespace_budgets(
                {"ns-budget": NamespaceBudgetRow(Decimal(10**7), "UTC", "bench")}
            )
            budgeted = write_path(history, 200, "ns-budget", "b")
            print(
                f"... in a namespace with {MONTH_ROWS} runs this month: {unbudgeted:.2f} ms "
                f"without a namespace budget, {budgeted:.2f} ms with one "
                f"({budgeted / unbudgeted:.2f}x)"
            )


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 200_000,
        int(sys.argv[2]) if len(sys.argv) > 2 else 30,
    )
