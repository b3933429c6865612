"""A runner pod whose Job is gone (the CronJob pruned it while no operator ran) keeps its
summary under the operator's finalizer; the operator records the attempt from it, against real
PostgreSQL. Pods are given as the API returns them (plain objects)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from agent_runner.summary import Summary
from nocturne_operator.runs.verdicts import pod_finished, record_orphaned_pod
from nocturne_operator.storage import Caps, ExecutionKey, History

pytestmark = pytest.mark.integration
NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
SCHEDULE = {"metadata": {"name": "news", "namespace": "ns", "uid": "uid-news"}, "spec": {}}


def pod(phase: str, summary: Summary | None, *, job_uid: str = "uid-job") -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 0 if phase == "Succeeded" else 1}
    terminated["finishedAt"] = "2026-12-02T09:02:00Z"
    if summary is not None:
        terminated["message"] = summary.to_message()
    return {
        "metadata": {
            "name": "news-m1-abcde",
            "namespace": "ns",
            "uid": "uid-pod",
            "creationTimestamp": "2026-12-02T09:00:00Z",
            "deletionTimestamp": "2026-12-02T09:30:00Z",
            "finalizers": ["nocturne.dev/run-record"],
            "labels": {
                "batch.kubernetes.io/job-name": "news-m1",
                "batch.kubernetes.io/controller-uid": job_uid,
                "nocturne.dev/schedule": "news",
            },
        },
        "status": {
            "phase": phase,
            "startTime": "2026-12-02T09:00:01Z",
            "containerStatuses": [{"name": "runner", "state": {"terminated": terminated}}],
        },
    }


def granted(history: History) -> int:
    grant = history.reserve(
        ExecutionKey("ns", "news", "uid-news", "news-m1", "uid-job", "uid-pod", 0),
        model="gpt-4o-mini",
        provider="openai",
        started_at=NOW,
        caps=Caps(Decimal("0.50"), Decimal("5.00"), None, None),
    )
    return grant.execution_id


def test_a_granted_run_is_recorded_from_its_summary_at_its_real_cost(history: History) -> None:
    """Its finish never reached the run API (no operator): without the pod, the reaper would
    have cancelled the row at the last reported cost (0) and the spend would be lost."""
    run_id = granted(history)
    summary = Summary(
        execution_id=run_id,
        status="SUCCEEDED",
        cost_usd=Decimal("0.000087"),
        input_tokens=120,
        output_tokens=40,
        started_at=NOW,
        completed_at=NOW + timedelta(minutes=2),
        output_preview="Three stories today.",
    )
    assert record_orphaned_pod(pod("Succeeded", summary), SCHEDULE, history) == 1
    row = history.get(run_id)
    assert row is not None
    assert (row.status, row.cost_usd, row.input_tokens) == (
        RunOutcome.SUCCEEDED,
        Decimal("0.000087"),
        120,
    )
    assert row.metadata.get("recordedBy") == "operator"
    # A second sweep over the same pod changes nothing.
    assert record_orphaned_pod(pod("Succeeded", summary), SCHEDULE, history) == 0
    assert history.get(run_id) == row


def test_a_pod_without_a_summary_fails_its_attempt_and_a_running_pod_waits(
    history: History,
) -> None:
    run_id = granted(history)
    running = pod("Running", None)
    assert not pod_finished(running)
    assert record_orphaned_pod(running, SCHEDULE, history) == 0
    assert record_orphaned_pod(pod("Failed", None), SCHEDULE, history) == 1
    row = history.get(run_id)
    assert row is not None
    assert row.status is RunOutcome.FAILED
    assert row.error is not None
    assert "without a result" in row.error


def test_a_pod_without_job_labels_is_left_alone(history: History) -> None:
    stray = pod("Succeeded", None)
    del stray["metadata"]["labels"]["batch.kubernetes.io/controller-uid"]
    assert record_orphaned_pod(stray, SCHEDULE, history) == 0
    assert history.for_job("uid-job") == []
