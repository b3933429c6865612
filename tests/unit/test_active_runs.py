"""``status.activeRun`` (issue 14): what the run API hears of a run in flight, throttled into
passes, shown on status by an idempotent reconcile, gone when the run ends or its Job does."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from agent_runner.contract import (
    Checkpoint,
    FinishReport,
    Grant,
    ModelPrice,
    ProgressReport,
    RunOutcome,
    RunRef,
    parse_task_document,
)
from nocturne_operator.controller.active import ActiveRun, ActiveRuns
from nocturne_operator.controller.queue import WorkQueue
from nocturne_operator.controller.reconcile import Plan
from nocturne_operator.runapi.auth import RunIdentity
from unit.test_reconcile_rails import NOW, Cluster, schedule, stats

KEY = ("research", "digest")
PRICE = ModelPrice(
    provider="offline",
    model="offline-demo",
    input_usd_per_mtok=Decimal(0),
    output_usd_per_mtok=Decimal(0),
    max_output_tokens=1000,
)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def identity(job: str = "digest-1", pod: str = "pod-1") -> RunIdentity:
    task = {
        "version": 1,
        "schedule": {"namespace": "research", "name": "digest", "uid": "uid-digest"},
        "task": {"query": "digest"},
        "agent": {"model": "offline-demo", "provider": "offline", "maxSteps": 8},
        "budget": {"maxPerRunUSD": "0.50"},
        "timeoutSeconds": 600,
    }
    return RunIdentity(
        namespace="research",
        schedule="digest",
        schedule_uid="uid-digest",
        job_name=job,
        job_uid=f"{job}-uid",
        pod_name=pod,
        pod_uid=f"{pod}-uid",
        task=parse_task_document(json.dumps(task)),
    )


def grant(spent_before: str = "0", resume: Checkpoint | None = None) -> Grant:
    return Grant(
        execution_id=1,
        attempt=1 if resume else 0,
        limit_usd=Decimal("0.50") - Decimal(spent_before),
        spent_before_usd=Decimal(spent_before),
        price=PRICE,
        resume=resume,
    )


def progress(who: RunIdentity, cost: str, steps: int, activity: str | None) -> ProgressReport:
    return ProgressReport(
        run=RunRef(
            namespace=who.namespace,
            schedule=who.schedule,
            schedule_uid=who.schedule_uid,
            job_uid=who.job_uid,
            pod_uid=who.pod_uid,
        ),
        execution_id=1,
        cost_usd=Decimal(cost),
        input_tokens=0,
        output_tokens=0,
        steps=steps,
        activity=activity,
    )


def finish(who: RunIdentity) -> FinishReport:
    return FinishReport(
        run=progress(who, "0", 0, None).run,
        execution_id=1,
        status=RunOutcome.SUCCEEDED,
        completed_at=NOW,
        cost_usd=Decimal(0),
        input_tokens=0,
        output_tokens=0,
    )


def store() -> tuple[ActiveRuns, list[tuple[tuple[str, str], float]], Clock]:
    calls: list[tuple[tuple[str, str], float]] = []
    clock = Clock()
    return ActiveRuns(queue=lambda k, w: calls.append((k, w)), clock=clock), calls, clock


def test_a_run_shows_from_its_grant_to_its_finish() -> None:
    runs, calls, clock = store()
    who = identity()
    runs.started(who, grant())
    [run] = runs.of(KEY)
    assert run.status() == {
        "job": "digest-1",
        "attempt": 0,
        "startedAt": "2026-11-26T01:00:00Z",
        "step": 0,
        "maxSteps": 8,
        "costUSD": "0.00",
        "budgetUSD": "0.50",
        "activity": "starting",
        "updatedAt": "2026-11-26T01:00:00Z",
        "summary": "step 0/8, 0.00 of 0.50 USD",
    }
    clock.now += timedelta(seconds=3)
    runs.progressed(who, progress(who, "0.0123", 2, "web_fetch news.test"))
    [run] = runs.of(KEY)
    assert (run.step, run.cost, run.activity) == (2, Decimal("0.0123"), "web_fetch news.test")
    assert run.status()["summary"] == "step 2/8, 0.0123 of 0.50 USD"
    # A report without an activity keeps the last one; steps never go back.
    runs.progressed(who, progress(who, "0.02", 1, None))
    assert runs.of(KEY)[0].activity == "web_fetch news.test"
    assert runs.of(KEY)[0].step == 2
    assert calls == [(KEY, 0.0), (KEY, runs.refresh), (KEY, runs.refresh)]
    runs.finished(who, finish(who))
    assert runs.of(KEY) == []
    assert calls[-1] == (KEY, 0.0)


def test_a_retry_counts_what_the_jobs_earlier_attempts_spent_and_their_steps() -> None:
    runs, _, _ = store()
    checkpoint = Checkpoint.model_validate(
        {
            "step": 2,
            "messages": [{"role": "user", "text": "digest"}],
            "costUSD": "0.10",
            "inputTokens": 1,
            "outputTokens": 1,
        }
    )
    who = identity(pod="pod-2")
    runs.started(who, grant("0.10", checkpoint))
    runs.progressed(who, progress(who, "0.05", 3, "model call 3/8"))
    [run] = runs.of(KEY)
    assert (run.attempt, run.step, run.cost, run.budget) == (1, 3, Decimal("0.15"), Decimal("0.50"))


def test_a_report_from_a_run_this_process_did_not_start_waits_for_the_next_grant() -> None:
    runs, calls, _ = store()
    who = identity()
    runs.progressed(who, progress(who, "0.01", 1, "model call 1/8"))
    assert runs.of(KEY) == []
    assert calls == []


def test_activity_is_one_printable_line_of_bounded_length() -> None:
    runs, _, _ = store()
    who = identity()
    runs.started(who, grant())
    runs.progressed(who, progress(who, "0", 1, "web_fetch\n\x1b]8;;evil\x07 " + "x" * 170))
    activity = runs.of(KEY)[0].activity
    assert activity is not None
    assert activity.isprintable()
    assert "\x1b" not in activity
    assert len(activity) <= 120


def test_an_entry_ends_with_its_job_or_at_its_deadline() -> None:
    runs, _, clock = store()
    first, second = identity("digest-1"), identity("digest-2", "pod-2")
    runs.started(first, grant())
    clock.now += timedelta(seconds=1)
    runs.started(second, grant())
    assert [r.job for r in runs.of(KEY)] == ["digest-2", "digest-1"]  # the latest first
    runs.forget(KEY, {"digest-2-uid"})
    assert [r.job for r in runs.of(KEY)] == ["digest-1"]
    # Killed without its final report, and its Job never seen finishing: gone after the
    # run's timeout (600 s) and a minute.
    clock.now += timedelta(seconds=658)
    assert runs.of(KEY) != []
    clock.now += timedelta(seconds=1)
    assert runs.of(KEY) == []


def test_progress_costs_one_pass_per_refresh_and_never_postpones_one() -> None:
    now = [0.0]
    queue = WorkQueue(clock=lambda: now[0])
    queue.add_within(KEY, 5.0)
    queue.add_within(KEY, 5.0)  # within the pending timer: nothing changes
    now[0] = 4.0
    queue.add_within(KEY, 5.0)  # the timer at 5 s stays: not pushed back to 9 s
    assert queue.get(timeout=0) is None
    now[0] = 5.0
    assert queue.get(timeout=0) == KEY
    queue.done(KEY)
    # A later resync timer is brought forward by progress.
    queue.add_after(KEY, 3600.0)
    queue.add_within(KEY, 5.0)
    now[0] = 10.0
    assert queue.get(timeout=0) == KEY


def active_run(**fields: Any) -> ActiveRun:
    values: dict[str, Any] = {
        "job": "digest-1",
        "job_uid": "digest-1-uid",
        "attempt": 0,
        "started_at": NOW,
        "step": 3,
        "max_steps": 8,
        "cost": Decimal("0.04"),
        "budget": Decimal("0.50"),
        "spent_before": Decimal(0),
        "activity": "model call 4/8",
        "updated_at": NOW,
        "expires_at": NOW + timedelta(minutes=11),
    }
    return ActiveRun(**(values | fields))


def test_status_shows_the_active_run_once_and_drops_it_when_it_ends() -> None:
    cluster = Cluster(schedule())
    older = active_run(job="digest-0", job_uid="digest-0-uid", started_at=NOW - timedelta(1))
    plan = cluster_plan(cluster, [active_run(), older])
    assert cluster.status["activeRun"]["summary"] == "step 3/8, 0.04 of 0.50 USD"
    assert cluster.status["activeRun"]["job"] == "digest-1"
    assert cluster.status["activeRun"]["others"] == 1
    # The pass is due when the entry would expire (a runner killed without its report).
    assert plan.due is not None
    assert plan.due <= NOW + timedelta(minutes=11)
    # Idempotent: the same reports, no status write.
    assert cluster_plan(cluster, [active_run(), older]).status == {}
    cluster_plan(cluster, [])
    assert "activeRun" not in cluster.status


def cluster_plan(cluster: Cluster, active: list[ActiveRun]) -> Plan:
    return cluster.plan(stats(), active=active)
