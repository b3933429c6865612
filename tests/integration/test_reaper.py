"""The reaper finalises RUNNING rows whose Job or pod is gone, against real PostgreSQL; Jobs and
pods are given as the API returns them (plain objects)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from nocturne_operator.runs.verdicts import reap
from nocturne_operator.storage import (
    Caps,
    ExecutionKey,
    GrantRecord,
    History,
    upgrade,
)

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def history(postgres: PostgresServer) -> Iterator[History]:
    url = postgres.fresh_schema(f"reaper_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    with History.connect(url) as store:
        yield store


def running(history: History, job: str, attempt: int = 0, cost: str = "0.20") -> tuple[int, str]:
    pod_uid = f"pod-{job}-{attempt}"
    run_id = history.start(
        ExecutionKey("ns", "news", "uid-news", job, f"uid-{job}", pod_uid, attempt),
        model="m",
        provider="offline",
        started_at=NOW - timedelta(hours=1, minutes=-attempt),
    )
    history.record_progress(run_id, cost_usd=Decimal(cost), input_tokens=5, output_tokens=7)
    return run_id, pod_uid


def job(name: str, condition: str | None = None, reason: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {}
    if condition:
        status = {
            "conditions": [
                {
                    "type": condition,
                    "status": "True",
                    "reason": reason,
                    "message": "Job was active longer than specified deadline"
                    if reason == "DeadlineExceeded"
                    else "",
                    "lastTransitionTime": "2026-11-26T11:30:00Z",
                }
            ],
            "completionTime": "2026-11-26T11:30:00Z" if condition == "Complete" else None,
        }
    return {"metadata": {"name": name, "uid": f"uid-{name}"}, "status": status}


def pod(uid: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": uid}}


def status_of(history: History, job_name: str) -> list[tuple[int, str, str | None]]:
    return [(r.attempt, r.status.value, r.error) for r in history.for_job(f"uid-{job_name}")]


def test_each_kind_of_disappearance_gets_its_final_status(history: History) -> None:
    running(history, "deleted")
    running(history, "evicted")
    running(history, "deadline")
    running(history, "lost-success")
    running(history, "retried", 0)
    running(history, "retried", 1)
    _, alive_pod = running(history, "alive")
    jobs = [
        job("evicted"),  # still running: the Job controller starts another pod
        job("deadline", "Failed", "DeadlineExceeded"),
        job("lost-success", "Complete"),
        job("retried", "Complete"),
        job("alive"),
    ]
    stuck = history.stuck_running(timedelta(minutes=2))
    # The newest attempt of "retried" still has its pod, like "alive".
    pods = [pod(alive_pod), pod("pod-retried-1")]
    finalised = reap(stuck, jobs, pods, history, now=NOW)
    assert sorted((r.job_name, s.value) for r, s in finalised) == [
        ("deadline", "TIMED_OUT"),
        ("deleted", "CANCELLED"),
        ("evicted", "CANCELLED"),
        ("lost-success", "SUCCEEDED"),
        ("retried", "FAILED"),
    ]
    assert status_of(history, "deleted") == [
        (0, "CANCELLED", "Job deleted was deleted before the run finished")
    ]
    [(_, _, deadline_error)] = status_of(history, "deadline")
    assert deadline_error is not None
    assert deadline_error.startswith("the pod of attempt 0 is gone; Job deadline exceeded")
    assert status_of(history, "alive") == [(0, "RUNNING", None)]
    assert [s for _, s, _ in status_of(history, "retried")] == ["FAILED", "RUNNING"]
    # Cost and tokens recorded while the run went on are kept.
    [row] = history.for_job("uid-lost-success")
    assert (row.cost_usd, row.input_tokens, row.output_tokens) == (Decimal("0.20"), 5, 7)
    assert row.metadata.get("recordedBy") == "reaper"
    assert row.completed_at == datetime(2026, 11, 26, 11, 30, tzinfo=UTC)


def test_reaping_twice_changes_nothing(history: History) -> None:
    running(history, "deleted")
    first = reap(history.stuck_running(timedelta(minutes=2)), [], [], history, now=NOW)
    assert len(first) == 1
    before = history.for_job("uid-deleted")
    assert reap(history.stuck_running(timedelta(minutes=2)), [], [], history, now=NOW) == []
    assert history.for_job("uid-deleted") == before


def test_the_first_final_status_wins_over_a_late_reap(history: History) -> None:
    """The runner finished between the reaper's query and its write: the runner's row stands."""
    run_id, _ = running(history, "raced")
    stuck = history.stuck_running(timedelta(minutes=2))
    history.finish(
        run_id,
        status=RunOutcome.SUCCEEDED,
        completed_at=NOW,
        cost_usd=Decimal("0.30"),
        input_tokens=9,
        output_tokens=9,
        output="done",
    )
    [(_, stored)] = reap(stuck, [], [], history, now=NOW)
    assert stored is RunOutcome.SUCCEEDED
    assert status_of(history, "raced") == [(0, "SUCCEEDED", None)]


def test_a_reaped_attempt_holds_its_cost_not_its_grant(history: History) -> None:
    """A RUNNING row holds its whole grant of the schedule's budget; once reaped it holds only
    what it recorded, so the grant it never spent goes back to the schedule."""
    caps = Caps(Decimal("0.50"), total=Decimal("0.60"))

    def reserve(job: str) -> GrantRecord:
        key = ExecutionKey("ns", "news", "uid-news", job, f"uid-{job}", f"pod-{job}-0", 0)
        return history.reserve(key, model="m", provider="offline", started_at=NOW, caps=caps)

    grant = reserve("gone")
    assert grant.limit == Decimal("0.50")
    history.record_progress(
        grant.execution_id, cost_usd=Decimal("0.20"), input_tokens=1, output_tokens=1
    )
    assert reserve("next").limit == Decimal("0.10")

    [(row, stored)] = reap(history.running("uid-news")[:1], [], [], history, now=NOW)
    assert (row.granted_usd, stored) == (Decimal("0.50"), RunOutcome.CANCELLED)
    [reaped] = history.for_job("uid-gone")
    assert (reaped.cost_usd, reaped.granted_usd) == (Decimal("0.20"), Decimal("0.50"))
    # 0.60 - 0.20 spent by the reaped attempt - 0.10 granted to the running one.
    assert reserve("later").limit == Decimal("0.30")
