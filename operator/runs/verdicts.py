"""Finished Jobs -> final execution rows. Runners report through the run API; this closes the
gaps: a run whose final report did not reach it (the operator was down) is written from its
termination summary, and an attempt that left no result (killed at the deadline, never started)
is finalised from the Job's conditions. A pod whose Job is gone is recorded from its summary
(``record_orphaned_pod``): runner pods carry a finalizer until then.

Idempotent per Job and pod UID: replays and operator restarts change nothing (the history keeps
the first final status and never lowers cost).

The reaper closes the last gap: a row left RUNNING whose Job or pod no longer exists (deleted,
garbage-collected, evicted) is finalised, so no run stays "running" forever.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agent_runner.contract import RunOutcome
from agent_runner.summary import Summary, parse_summary
from nocturne_operator.api.timestamps import parse_rfc3339, rfc3339
from nocturne_operator.storage import ExecutionKey, ExecutionRecord, History

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """A finished Job: its terminal condition."""

    succeeded: bool
    reason: str
    message: str
    finished_at: datetime


def cancellable(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names of ``jobs`` still running and not already being deleted (what a cancel
    deletes), sorted."""
    return sorted(
        job["metadata"]["name"]
        for job in jobs
        if job_outcome(job) is None and not job["metadata"].get("deletionTimestamp")
    )


def job_outcome(job: Mapping[str, Any]) -> JobOutcome | None:
    """The Job's terminal condition, or None while it runs."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            stamp = (job.get("status") or {}).get("completionTime") or cond.get(
                "lastTransitionTime"
            )
            return JobOutcome(
                cond["type"] == "Complete",
                cond.get("reason", ""),
                cond.get("message", ""),
                parse_rfc3339(stamp) if stamp else datetime.now(UTC),
            )
    return None


def record_finished_job(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    schedule: Mapping[str, Any],
    history: History,
) -> int:
    """Make sure every attempt of a finished Job has a final row; returns how many rows were
    written or finalised here (0 when the runner already recorded everything)."""
    outcome = job_outcome(job)
    if outcome is None:
        return 0
    meta = job["metadata"]
    rows = {row.pod_uid: row for row in history.for_job(meta["uid"])}
    agent = (schedule.get("spec") or {}).get("agent") or {}
    ordered = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    written = 0
    for attempt, pod in enumerate(ordered):
        pod_uid = pod["metadata"]["uid"]
        row = rows.get(pod_uid)
        if row is not None and row.status is not RunOutcome.RUNNING:
            continue
        summary = _summary(pod)
        status, error = _final_status(summary, outcome, pod)
        run_id = (
            row.id
            if row is not None
            else history.start(
                ExecutionKey(
                    namespace=meta["namespace"],
                    schedule_name=schedule["metadata"]["name"],
                    schedule_uid=schedule["metadata"]["uid"],
                    job_name=meta["name"],
                    job_uid=meta["uid"],
                    pod_uid=pod_uid,
                    attempt=attempt,
                    manual_request=(meta.get("annotations") or {}).get(
                        "nocturne.dev/manual-request"
                    ),
                ),
                model=str(agent.get("model", "unknown")),
                provider=str(agent.get("provider", "unknown")),
                started_at=_started(pod, job),
            )
        )
        history.finish(
            run_id,
            status=status,
            completed_at=(summary.completed_at if summary and summary.completed_at else None)
            or _finished(pod, job),
            cost_usd=max(
                summary.cost_usd if summary else Decimal(0), row.cost_usd if row else Decimal(0)
            ),
            input_tokens=max(
                summary.input_tokens if summary else 0, row.input_tokens if row else 0
            ),
            output_tokens=max(
                summary.output_tokens if summary else 0, row.output_tokens if row else 0
            ),
            output=summary.output_preview if summary else None,
            error=error,
            alert=bool(summary and summary.alert),
            alert_reason=summary.alert_reason if summary else None,
            metadata={"recordedBy": "operator"},
            # Without the runner's final summary, the call it may have had in flight counts.
            in_flight=summary is None or not summary.status.final,
        )
        written += 1
        log.info(
            "recorded %s for Job %s/%s pod %s",
            status.value,
            meta["namespace"],
            meta["name"],
            pod["metadata"]["name"],
        )
    return written


def record_ended_attempts(
    job: Mapping[str, Any],
    rows: Sequence[ExecutionRecord],
    pods: Sequence[Mapping[str, Any]],
    history: History,
    *,
    now: datetime,
) -> int:
    """Finalise the RUNNING ``rows`` of a Job still running whose runner containers the kubelet
    reports terminated: the Job has started another attempt, and an ended one must not keep
    holding its whole grant (a runner killed mid-run would otherwise get its Job's retry refused
    its budget). Recorded from the pod's summary, as at the Job's end, charged the call it had
    in flight. An attempt whose pod is gone from the API, or only marked Failed (a lost node,
    a forced deletion: its container may still run and spend), keeps its grant until the reaper
    or the Job's end records it. Returns how many rows were finalised."""
    by_uid = {p["metadata"]["uid"]: p for p in pods}
    ended = [p for r in rows if (p := by_uid.get(r.pod_uid)) is not None and runner_ended(p)]
    if not ended:
        return 0
    failed = _ended_job(
        job["metadata"],
        succeeded=False,
        message="the attempt's pod ended; the Job retries it",
        at=now,
    )
    return record_finished_job(failed, ended, {"metadata": {}}, history)


def runner_ended(pod: Mapping[str, Any]) -> bool:
    """The pod has finished and the kubelet reports its runner container terminated (not only
    a phase set by the control plane for a pod it cannot reach)."""
    if not pod_finished(pod):
        return False
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(
        s.get("name") == "runner" and (s.get("state") or {}).get("terminated") for s in statuses
    )


def pod_finished(pod: Mapping[str, Any]) -> bool:
    """The runner container has ended (the pod Succeeded or Failed)."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def record_orphaned_pod(
    pod: Mapping[str, Any], schedule: Mapping[str, Any], history: History
) -> int:
    """Record the attempt of a finished runner pod whose Job is gone (the CronJob pruned it
    while no operator ran, or it was deleted): the pod's summary is the record. The Job's
    identity comes from the labels the Job controller puts on its pods."""
    labels = pod["metadata"].get("labels") or {}
    job_uid = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    job_name = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    if not job_uid or not job_name or not pod_finished(pod):
        return 0
    succeeded = (pod.get("status") or {}).get("phase") == "Succeeded"
    job = _ended_job(
        {"name": job_name, "uid": job_uid, "namespace": pod["metadata"]["namespace"]},
        succeeded=succeeded,
        message="the Job was gone before the operator recorded the run",
        at=_finished(pod, {}),
    )
    return record_finished_job(job, [pod], schedule, history)


def _ended_job(
    metadata: Mapping[str, Any], *, succeeded: bool, message: str, at: datetime
) -> dict[str, Any]:
    """A Job as ``record_finished_job`` reads one that ended (Complete, or Failed with
    PodFailed) at ``at``: for attempts recorded while their Job is gone or still retrying."""
    return {
        "metadata": dict(metadata),
        "status": {
            "completionTime": rfc3339(at),
            "conditions": [
                {
                    "type": "Complete" if succeeded else "Failed",
                    "status": "True",
                    "reason": "" if succeeded else "PodFailed",
                    "message": message,
                }
            ],
        },
    }


def _summary(pod: Mapping[str, Any]) -> Summary | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated and terminated.get("message"):
            return parse_summary(terminated["message"])
    return None


def _final_status(
    summary: Summary | None, outcome: JobOutcome, pod: Mapping[str, Any]
) -> tuple[RunOutcome, str | None]:
    if summary is not None and summary.status.final:
        return summary.status, summary.error
    if outcome.reason == "DeadlineExceeded":
        return RunOutcome.TIMED_OUT, f"Job deadline exceeded: {outcome.message}"
    pod_status = pod.get("status") or {}
    why = pod_status.get("message") or pod_status.get("reason") or outcome.message
    return RunOutcome.FAILED, f"the pod ended without a result ({outcome.reason}): {why}"


def _started(pod: Mapping[str, Any], job: Mapping[str, Any]) -> datetime:
    stamp = (
        (pod.get("status") or {}).get("startTime")
        or (job.get("status") or {}).get("startTime")
        or pod["metadata"].get("creationTimestamp")
    )
    return parse_rfc3339(stamp) if stamp else datetime.now(UTC)


def _finished(pod: Mapping[str, Any], job: Mapping[str, Any]) -> datetime:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        finished = ((status.get("state") or {}).get("terminated") or {}).get("finishedAt")
        if finished:
            return parse_rfc3339(finished)
    stamp = (job.get("status") or {}).get("completionTime")
    return parse_rfc3339(stamp) if stamp else datetime.now(UTC)


def reap(
    stuck: Sequence[ExecutionRecord],
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    history: History,
    *,
    now: datetime,
) -> list[tuple[ExecutionRecord, RunOutcome]]:
    """Finalise RUNNING rows (of one namespace) whose Job or pod is gone; returns the rows
    finalised and the status they got. ``jobs`` and ``pods`` are everything that exists now.

    - Job gone (deleted, or garbage-collected with its schedule): CANCELLED.
    - Job there, pod gone, Job finished: the Job's verdict (TIMED_OUT at its deadline, else
      FAILED), as for an attempt that left no result.
    - Job there, pod gone, Job still running (the pod was evicted or deleted and the Job
      controller starts another): CANCELLED, which does not count as a failed run.
    A row whose pod still exists is left alone; ``record_finished_job`` handles it when the Job
    finishes. Rows finalised by someone else in the meantime keep their status (first wins).
    """
    jobs_by_uid = {j["metadata"]["uid"]: j for j in jobs}
    pod_uids = {p["metadata"]["uid"] for p in pods}
    done: list[tuple[ExecutionRecord, RunOutcome]] = []
    for row in stuck:
        if row.status is not RunOutcome.RUNNING or row.pod_uid in pod_uids:
            continue
        job = jobs_by_uid.get(row.job_uid)
        outcome = job_outcome(job) if job is not None else None
        gone = f"the pod of attempt {row.attempt} is gone"
        completed = now
        if job is None:
            status = RunOutcome.CANCELLED
            error = f"Job {row.job_name} was deleted before the run finished"
        elif outcome is None:
            status = RunOutcome.CANCELLED
            error = f"{gone} (evicted or deleted); the Job goes on with another pod"
        else:
            completed = outcome.finished_at
            retried = any(r.attempt > row.attempt for r in history.for_job(row.job_uid))
            if retried:
                status, error = RunOutcome.FAILED, f"{gone}; the Job retried it"
            elif outcome.succeeded:
                # The runner exited 0 but its result was lost with the pod: the cost recorded
                # while it ran (plus a call it reported in flight) is all we know.
                status = RunOutcome.SUCCEEDED
                error = f"{gone}; the Job completed, its final result was not recorded"
            elif outcome.reason == "DeadlineExceeded":
                status = RunOutcome.TIMED_OUT
                error = f"{gone}; Job deadline exceeded: {outcome.message}"
            else:
                status = RunOutcome.FAILED
                error = f"{gone}; the Job failed ({outcome.reason}): {outcome.message}"
        stored = history.finish(
            row.id,
            status=status,
            completed_at=max(completed, row.started_at),
            cost_usd=row.cost_usd,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            error=error,
            metadata={**row.metadata, "recordedBy": "reaper"},
            in_flight=True,
        )
        log.info(
            "reaped execution %s of %s/%s (Job %s): %s",
            row.id,
            row.namespace,
            row.schedule_name,
            row.job_name,
            stored.value,
        )
        done.append((row, stored))
    return done
