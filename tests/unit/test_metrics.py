"""The per-schedule series: what Prometheus scrapes, from zero, and gone with the schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from prometheus_client import generate_latest

from agent_runner.contract import RunOutcome
from nocturne_operator.adapters import metrics

START = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def scrape() -> list[str]:
    return generate_latest(metrics.REGISTRY).decode().splitlines()


def series(name: str, namespace: str, schedule: str) -> list[str]:
    ours = (f'namespace="{namespace}"', f'schedule="{schedule}"')
    return [line for line in scrape() if line.startswith(name) and all(o in line for o in ours)]


def test_a_new_schedule_has_every_series_at_zero() -> None:
    metrics.observe_schedule("m-zero", "digest", "Active")
    lines = series("nocturne_", "m-zero", "digest")
    for result in metrics.RESULTS:
        assert (
            f'nocturne_runs_total{{namespace="m-zero",result="{result}",schedule="digest"}} 0.0'
            in lines
        )
    for name in (
        "nocturne_run_cost_usd_total",
        "nocturne_budget_exhausted_total",
        "nocturne_auto_pauses_total",
        "nocturne_run_duration_seconds_count",
    ):
        assert f'{name}{{namespace="m-zero",schedule="digest"}} 0.0' in lines
    assert "# TYPE nocturne_runs_total counter" in scrape()
    assert "# TYPE nocturne_run_duration_seconds histogram" in scrape()


def test_runs_cost_tokens_and_durations_add_up() -> None:
    metrics.observe_schedule("m-runs", "digest", "Active")
    for seconds, outcome in ((3, RunOutcome.SUCCEEDED), (90, RunOutcome.FAILED)):
        metrics.observe_run(
            "m-runs",
            "digest",
            result=outcome,
            cost=Decimal("0.125"),
            input_tokens=100,
            output_tokens=20,
            started=START,
            completed=START + timedelta(seconds=seconds),
        )
    metrics.observe_run(  # still running when recorded: no duration
        "m-runs",
        "digest",
        result=RunOutcome.TIMED_OUT,
        cost=Decimal(0),
        input_tokens=0,
        output_tokens=0,
        started=START,
        completed=None,
    )
    metrics.count_auto_pause("m-runs", "digest")
    lines = series("nocturne_", "m-runs", "digest")
    key = 'namespace="m-runs",schedule="digest"'
    assert (
        'nocturne_runs_total{namespace="m-runs",result="succeeded",schedule="digest"} 1.0' in lines
    )
    assert 'nocturne_runs_total{namespace="m-runs",result="failed",schedule="digest"} 1.0' in lines
    assert f"nocturne_run_cost_usd_total{{{key}}} 0.25" in lines
    assert (
        'nocturne_tokens_total{direction="input",namespace="m-runs",schedule="digest"} 200.0'
        in lines
    )
    assert f"nocturne_auto_pauses_total{{{key}}} 1.0" in lines
    assert f"nocturne_run_duration_seconds_count{{{key}}} 2.0" in lines
    assert f"nocturne_run_duration_seconds_sum{{{key}}} 93.0" in lines
    # Cumulative buckets: 3 s is within 5 s, 90 s within 120 s.
    assert f'nocturne_run_duration_seconds_bucket{{le="1.0",{key}}} 0.0' in lines
    assert f'nocturne_run_duration_seconds_bucket{{le="5.0",{key}}} 1.0' in lines
    assert f'nocturne_run_duration_seconds_bucket{{le="60.0",{key}}} 1.0' in lines
    assert f'nocturne_run_duration_seconds_bucket{{le="120.0",{key}}} 2.0' in lines
    assert f'nocturne_run_duration_seconds_bucket{{le="+Inf",{key}}} 2.0' in lines


def test_a_deleted_schedule_leaves_no_series() -> None:
    metrics.observe_schedule("m-gone", "digest", "Active")
    metrics.count_budget_exhausted("m-gone", "digest")
    assert series("nocturne_", "m-gone", "digest")
    metrics.forget_schedule("m-gone", "digest")
    assert series("nocturne_", "m-gone", "digest") == []
