"""Finished runs into history, once: from Job events and passes (``record_job``), from runner
pods whose Job is gone (``record_orphaned_pods``), and rows left RUNNING (``reap``). Recording
feeds the run metrics and queues the run's notices; runner pods keep our finalizer until their
run is recorded."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from agent_runner.contract import RunOutcome
from nocturne_operator.adapters import metrics
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.notifications import notices
from nocturne_operator.notifications.notify import Notifier
from nocturne_operator.render import LABEL_SCHEDULE, RUN_RECORD_FINALIZER
from nocturne_operator.runs import verdicts
from nocturne_operator.runs.ledger import JobLedger
from nocturne_operator.runs.stats import RunStatsCache
from nocturne_operator.storage import ExecutionRecord, History, HistoryError

log = logging.getLogger(__name__)

# A RUNNING row younger than this may belong to a pod the API has not shown us yet.
REAP_AFTER = timedelta(minutes=2)

# (namespace, schedule name) -> the AgentSchedule object, or None when it is gone or not seen.
OwnerLookup = Callable[[str, str], dict[str, Any] | None]


@dataclass
class Recorder:
    """What recording needs: the clients, the ledger of Jobs already dealt with, the notifier
    (None: notifications are off) and when this process started (Jobs that finished before
    were counted by its predecessor)."""

    kube: Kube
    history: History | None
    notifier: Notifier | None
    started_at: datetime
    notification_max_age: timedelta
    ledger: JobLedger = field(default_factory=JobLedger)
    # Every write of a run below invalidates its schedule's statistics here.
    stats: RunStatsCache = field(default_factory=RunStatsCache)

    def record_job(self, job: Mapping[str, Any], schedule: Mapping[str, Any]) -> bool:
        """Record a finished Job's attempts once and queue its notices once; later passes skip
        it without any API or database call. False: deferred, the database is away (a pass
        comes back to it soon: nothing is lost meanwhile)."""
        history = self.history
        outcome = verdicts.job_outcome(job)
        if outcome is None:
            return True
        meta = job["metadata"]
        ledger = self.ledger
        if history is None:  # nothing to record into: the pods need not wait for it
            if meta["uid"] not in ledger.notified:
                selector = f"batch.kubernetes.io/job-name={meta['name']}"
                release_pods(self.kube, self.kube.list_objects("Pod", meta["namespace"], selector))
                ledger.notified.add(meta["uid"])
            return True
        with ledger.claim(meta["uid"]) as mine:
            if not mine:  # another pass is recording it
                return True
            try:
                self._record_and_notify(job, outcome, schedule, history)
            except HistoryError as exc:
                log.warning(
                    "recording Job %s/%s deferred: %s", meta["namespace"], meta["name"], exc
                )
                return False
        return True

    def _record_and_notify(
        self,
        job: Mapping[str, Any],
        outcome: verdicts.JobOutcome,
        schedule: Mapping[str, Any],
        history: History,
    ) -> None:
        """The work of ``record_job`` for a claimed Job: one history read serves the metrics
        and the notices."""
        ledger = self.ledger
        meta = job["metadata"]
        uid = meta["uid"]
        fresh = outcome.finished_at >= self.started_at
        attempts: list[ExecutionRecord] | None = None
        if uid not in ledger.recorded:
            kube = self.kube
            pods = kube.list_objects(
                "Pod", meta["namespace"], f"batch.kubernetes.io/job-name={meta['name']}"
            )
            try:
                verdicts.record_finished_job(job, pods, schedule, history)
            finally:
                self.stats.invalidate(schedule["metadata"]["uid"])
            # A finished Job is retried no more: its checkpoint has served.
            history.drop_checkpoints([uid])
            release_pods(kube, pods)
            attempts = history.for_job(uid, include_output=True)
            # Jobs that finished before this process started were counted by its predecessor.
            if fresh:
                count_runs(attempts)
            ledger.recorded.add(uid)
        age = datetime.now(UTC) - outcome.finished_at
        if fresh or age <= self.notification_max_age:
            # The outbox dedupes per Job: a predecessor's notices are not queued again.
            if attempts is None:
                attempts = history.for_job(uid, include_output=True)
            self._notify_run(attempts, schedule)
        ledger.notified.add(uid)

    def _notify_run(self, attempts: Sequence[ExecutionRecord], schedule: Mapping[str, Any]) -> None:
        """Queue the notices of a finished Job's outcome (its last attempt)."""
        notifier = self.notifier
        target = notices.Target.of(schedule)
        if notifier is None or target is None:
            return
        if not attempts or any(r.status is RunOutcome.RUNNING for r in attempts):
            return  # an attempt without its result yet: the reaper finalises it, then notifies
        last = max(attempts, key=lambda r: (r.attempt, r.started_at))
        run = notices.RunInfo(
            job=last.job_name,
            job_uid=last.job_uid,
            result=last.status,
            cost_usd=sum((r.cost_usd for r in attempts), Decimal(0)),
            started_at=min(r.started_at for r in attempts),
            completed_at=last.completed_at,
            output=last.output,
            error=last.error,
            alert=last.alert,
            alert_reason=last.alert_reason,
        )
        notifier.run_finished(
            notices.NoticeSubject.of(schedule), target, run, now=datetime.now(UTC)
        )

    def settle_ended_attempts(
        self, namespace: str, job_name: str, job_uid: str, pod_uid: str
    ) -> int:
        """A new pod of a Job asks for its grant: finalise the Job's earlier attempts whose
        runner containers the kubelet reports terminated, so that their grants no longer count
        against the Job's per-run cap beyond what they spent (``verdicts.record_ended_attempts``).
        A pod still running, gone, or only marked Failed keeps its grant. One history read,
        and a pod listing only when an earlier attempt is still RUNNING. Returns how many were
        finalised."""
        history = self.history
        if history is None:
            return 0
        rows = [
            row
            for row in history.for_job(job_uid)
            if row.status is RunOutcome.RUNNING and row.pod_uid != pod_uid
        ]
        if not rows:
            return 0
        pods = self.kube.list_objects("Pod", namespace, f"batch.kubernetes.io/job-name={job_name}")
        job = {"metadata": {"name": job_name, "uid": job_uid, "namespace": namespace}}
        try:
            written = verdicts.record_ended_attempts(
                job, rows, pods, history, now=datetime.now(UTC)
            )
        finally:
            self.stats.invalidate(rows[0].schedule_uid)
        if written:
            log.info(
                "Job %s/%s: %d ended attempts recorded before its retry",
                namespace,
                job_name,
                written,
            )
        return written

    def record_orphaned_pods(
        self,
        owner_of: OwnerLookup,
        pods: Iterable[tuple[tuple[str, str], Iterable[dict[str, Any]]]],
    ) -> None:
        """Finished runner pods being deleted (their Job is gone) still carry their summary and
        our finalizer: record each attempt once, then let the pod go."""
        history = self.history
        for (namespace, name), held in pods:
            schedule = owner_of(namespace, name)
            for pod in list(held):
                if not pod["metadata"].get("deletionTimestamp"):
                    continue  # its Job is there: the Job's own path records it
                if history is None or schedule is None:  # nothing to record into, or for
                    release_pods(self.kube, [pod])
                    continue
                try:
                    verdicts.record_orphaned_pod(pod, schedule, history)
                    self.stats.invalidate(schedule["metadata"]["uid"])
                except HistoryError as exc:
                    log.warning(
                        "recording pod %s/%s deferred: %s", namespace, pod["metadata"]["name"], exc
                    )
                    continue
                release_pods(self.kube, [pod])

    def reap(self, owner_of: OwnerLookup) -> None:
        """Finalise executions left RUNNING whose Job or pod is gone (one query, then one Job
        and one pod listing per schedule that has such rows)."""
        history, kube, ledger = self.history, self.kube, self.ledger
        if history is None:
            return
        try:
            stuck = history.stuck_running(REAP_AFTER)
        except HistoryError as exc:
            log.warning("reaper skipped: %s", exc)
            return
        by_schedule: dict[tuple[str, str], list[ExecutionRecord]] = {}
        for row in stuck:
            by_schedule.setdefault((row.namespace, row.schedule_name), []).append(row)
        for (namespace, name), rows in by_schedule.items():
            selector = f"{LABEL_SCHEDULE}={name}"
            jobs = kube.list_objects("Job", namespace, selector)
            pods = kube.list_objects("Pod", namespace, selector)
            running_jobs = {j["metadata"]["uid"] for j in jobs if verdicts.job_outcome(j) is None}
            try:
                reaped = verdicts.reap(rows, jobs, pods, history, now=datetime.now(UTC))
            finally:
                for uid in {row.schedule_uid for row in rows}:
                    self.stats.invalidate(uid)
            reaped_jobs = {row.job_uid for row, _ in reaped}
            schedule = owner_of(namespace, name)
            for job in jobs:
                uid = job["metadata"]["uid"]
                if uid in reaped_jobs and uid not in running_jobs and schedule is not None:
                    # Its last attempt only now has a final status: its notices are due now.
                    ledger.notified.discard(uid)
                    self.record_job(job, schedule)
            for row, _ in reaped:
                if row.job_uid in running_jobs:
                    continue  # counted with its Job's other attempts when the Job finishes
                # As stored now: reaping charged the call in flight and set the end.
                stored = history.get(row.id, include_output=False)
                if stored is not None:
                    count_runs([stored])


def release_pods(kube: Kube, pods: Sequence[Mapping[str, Any]]) -> None:
    """Take our finalizer off recorded runner pods (they may go now)."""
    for pod in pods:
        meta = pod["metadata"]
        if RUN_RECORD_FINALIZER in (meta.get("finalizers") or []):
            kube.remove_finalizer("Pod", meta["namespace"], meta["name"], RUN_RECORD_FINALIZER)


def count_runs(attempts: Sequence[ExecutionRecord]) -> None:
    """Feed the run metrics with a finished Job's attempts."""
    for row in attempts:
        if row.status is not RunOutcome.RUNNING:
            metrics.observe_run(
                row.namespace,
                row.schedule_name,
                result=row.status,
                cost=row.cost_usd,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                started=row.started_at,
                completed=row.completed_at,
            )
