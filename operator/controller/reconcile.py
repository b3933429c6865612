"""The one reconcile: AgentSchedule -> CronJob (carrying each Job's task snapshot) + status.

Called for every pass of a schedule's key off the work queue (its changes, its CronJob's and
Jobs' events, a restart, the moment the last pass said it is due again). Decide,
then apply, the shape of the CronJob controller's ``syncCronJob``: ``decide`` is pure (the
schedule, the CronJob as the cluster has it, run statistics, the clock -> a ``Plan`` of object
writes, a status patch, Events and notices); ``apply`` carries a plan out. Idempotent: a second
pass with nothing changed plans nothing (objects are compared with their rendering, status is
patched only where it differs, Events and notices follow condition changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent_runner.contract import ENV_MANUAL_REQUEST, RunOutcome
from nocturne_operator.adapters import metrics
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.api import conditions as cond
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.api.money import usd
from nocturne_operator.api.timestamps import parse_rfc3339, rfc3339
from nocturne_operator.controller.active import ActiveRun
from nocturne_operator.prices import PriceTable
from nocturne_operator.render import (
    ANNOTATION_MANUAL_REQUEST,
    LABEL_SCHEDULE,
    RunApiEndpoint,
    ScheduleRef,
    cronjob_name,
    labels,
    legacy_task_configmap_name,
    manual_job_name,
    render_cronjob,
    render_job_template,
)
from nocturne_operator.runs.verdicts import cancellable
from nocturne_operator.schedule import cron
from nocturne_operator.schedule.validation import Limits, Peer, Validated, validate
from nocturne_operator.settings import Settings
from nocturne_operator.storage import (
    ExecutionRecord,
    RunStats,
    month_start,
    next_month_start,
)

log = logging.getLogger(__name__)

ANNOTATION_RUN_NOW = "nocturne.dev/run-now"
ANNOTATION_SUSPEND_REASON = "nocturne.dev/suspend-reason"
ANNOTATION_RESUME = "nocturne.dev/resume"
ANNOTATION_RESUME_REASON = "nocturne.dev/resume-reason"
ANNOTATION_CANCEL = "nocturne.dev/cancel"
# Status keys this module owns; everything else under status is left alone.
OWNED_STATUS = (
    "observedGeneration",
    "phase",
    "conditions",
    "cronJobName",
    "timeZone",
    "nextRunAt",
    "nextRunLocal",
    "nextRuns",
    "lastManualRun",
    "lastRun",
    "totalCostUSD",
    "thisMonth",
    "runs",
    "consecutiveFailures",
    "autoPause",
    "failuresCountedSince",
    "pendingVerification",
    "lastResumeRequest",
    "lastCancelRequest",
    "activeRun",
)

EventSink = Callable[[Mapping[str, Any], str, str, str], None]
"""(object, type Normal|Warning, reason, message) -> None"""
NoticeSink = Callable[[str, str, str], None]
"""(notification kind AutoPaused|BudgetExceeded|SilentStop, dedupe key, message) -> None"""
# Slack added to a silent-stop deadline: the Job's start may lag its slot.
SILENT_STOP_GRACE = timedelta(minutes=5)


def contains(actual: Any, desired: Any) -> bool:
    """True when every field of ``desired`` is present with the same value in ``actual``
    (fields the apiserver defaults, like a pod's dnsPolicy, are ignored)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and contains(actual[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


_MESSAGE_CHARS = 256


def _first_line(text: str | None) -> str | None:
    """The first line of a run's error, short enough for status."""
    lines = (text or "").strip().splitlines()
    if not lines:
        return None
    line = lines[0]
    return line if len(line) <= _MESSAGE_CHARS else line[: _MESSAGE_CHARS - 1] + "…"


def _dropping_removed_keys(new: Any, old: Any) -> Any:
    """A merge patch keeps keys it does not name: name the ones ``new`` no longer has."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {**dict.fromkeys(k for k in old if k not in new), **new}
    return new


def _last_run(last: ExecutionRecord) -> dict[str, Any]:
    """status.lastRun; ``message`` only when the run did not succeed (no key otherwise, so an
    unchanged run compares equal to what the apiserver returns)."""
    run: dict[str, Any] = {
        "job": last.job_name,
        "startedAt": rfc3339(last.started_at),
        "completedAt": rfc3339(last.completed_at) if last.completed_at else None,
        "result": last.status.display,
        "costUSD": usd(last.cost_usd),
        "inputTokens": last.input_tokens,
        "outputTokens": last.output_tokens,
    }
    message = None if last.status is RunOutcome.SUCCEEDED else _first_line(last.error)
    if message:
        run["message"] = message
    return run


def _mounts_legacy_task(cronjob: Mapping[str, Any] | None) -> bool:
    """True when the CronJob's pods still mount the pre-snapshot task ConfigMap."""
    if cronjob is None:
        return False
    pod = cronjob.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
    return any("configMap" in v for v in (pod.get("spec") or {}).get("volumes") or [])


@dataclass
class Plan:
    """What one reconcile pass decided, in the order ``apply`` carries it out."""

    phase: str
    # An existing CronJob to suspend (the spec became invalid; it is never deleted).
    suspend_cronjob: str | None = None
    # The CronJob to server-side apply (it differs from its rendering, or is missing).
    cronjob: dict[str, Any] | None = None
    # The task ConfigMap of a CronJob rendered before Jobs carried their own snapshot.
    delete_configmap: str | None = None
    # Run-now and verification Jobs; ``apply`` sets their owner's UID from the CronJob.
    jobs: list[dict[str, Any]] = field(default_factory=list)
    # A cancel request (its id): ``apply`` deletes the schedule's Jobs still running.
    cancel: str | None = None
    notices: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, key, message)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    status: dict[str, Any] = field(default_factory=dict)  # the merge patch; {}: unchanged
    # The first moment the clock alone changes what a pass decides (a slot passes and the next
    # runs move on, a silent-stop deadline, a new month); None: nothing waits on the clock.
    due: datetime | None = None

    def due_by(self, moment: datetime) -> None:
        """``moment`` changes what a pass decides: the next pass is due by then."""
        self.due = moment if self.due is None else min(self.due, moment)


def reconcile(
    body: Mapping[str, Any],
    settings: Settings,
    kube: Kube,
    *,
    events: EventSink,
    peers: Sequence[Peer] | None,
    stats: RunStats | None = None,
    run_api: RunApiEndpoint,
    prices: PriceTable | None = None,
    notices: NoticeSink | None = None,
    now: datetime | None = None,
    actual: dict[str, Any] | None,
    active: Sequence[ActiveRun] = (),
    limits: Limits | None = None,
    namespace_spent: Decimal | None = None,
) -> Plan:
    """Bring the CronJob and the status in line with the AgentSchedule; returns what was
    decided (the phase, and when the clock calls for the next pass). ``active``: the runs in
    flight, the latest started first (``status.activeRun``).
    ``stats`` (from PostgreSQL) fills the run results and drives auto-pause and the budgets;
    None when no database is configured. ``notices`` receives the schedule-level notifications
    (auto-pause, budget reached, silent stop); run-level ones come from finished Jobs.
    ``actual`` is the CronJob as the cluster has it (None: there is none). ``limits``: the
    namespace's, from its AgentSchedulePolicies (None: the cluster's settings);
    ``namespace_spent``: what the namespace's runs cost this month in its budget's zone (None:
    unknown, or no namespace budget)."""
    plan = decide(
        body,
        settings,
        actual,
        now=now or datetime.now(UTC),
        peers=peers,
        stats=stats,
        run_api=run_api,
        prices=prices,
        active=active,
        limits=limits,
        namespace_spent=namespace_spent,
    )
    apply(
        plan,
        body,
        actual,
        kube,
        events=events,
        notices=notices or (lambda _kind, _key, _message: None),
    )
    return plan


def decide(
    body: Mapping[str, Any],
    settings: Settings,
    actual: dict[str, Any] | None,
    *,
    now: datetime,
    peers: Sequence[Peer] | None,
    stats: RunStats | None,
    run_api: RunApiEndpoint,
    prices: PriceTable | None,
    active: Sequence[ActiveRun] = (),
    limits: Limits | None = None,
    namespace_spent: Decimal | None = None,
) -> Plan:
    """The pass's decisions, without any I/O: ``actual`` is the CronJob as the cluster has it
    (None: missing)."""
    planner = _Planner(
        body,
        settings,
        now,
        stats=stats,
        run_api=run_api,
        prices=prices,
        limits=limits or Limits.of(settings),
        namespace_spent=namespace_spent,
    )
    return planner.decide(peers, actual, active)


def apply(
    plan: Plan,
    body: Mapping[str, Any],
    actual: dict[str, Any] | None,
    kube: Kube,
    *,
    events: EventSink,
    notices: NoticeSink,
) -> None:
    """Carry out a plan: objects, then notices and Events, then status (a pass that fails on
    the way is repeated whole: status is what tells the next pass what was done)."""
    meta = body["metadata"]
    namespace = meta["namespace"]
    if plan.suspend_cronjob is not None:
        kube.merge_patch("CronJob", namespace, plan.suspend_cronjob, {"spec": {"suspend": True}})
    cronjob = actual
    if plan.cronjob is not None:
        cronjob = kube.apply(plan.cronjob)
    if plan.delete_configmap is not None:
        kube.delete("ConfigMap", namespace, plan.delete_configmap)
    if plan.cancel is not None:
        events(body, "Normal", "RunCancelled", _cancel(kube, namespace, meta["name"], plan.cancel))
    for job in plan.jobs:
        if cronjob is None:  # cannot happen: a Job is planned only with a CronJob to own it
            raise RuntimeError(f"run-now Job {job['metadata']['name']} has no CronJob to own it")
        [owner] = job["metadata"]["ownerReferences"]
        owner["uid"] = cronjob["metadata"]["uid"]
        if kube.create(job) is None:
            log.info("Job %s/%s already exists", namespace, job["metadata"]["name"])
    # Notices (kept in the outbox, deduplicated by key) and Events (with their audit rows)
    # before status: status is what tells the next pass they are done, so a crash in between
    # repeats them instead of losing them.
    for kind, key, message in plan.notices:
        notices(kind, key, message)
    for type_, reason, message in plan.events:
        events(body, type_, reason, message)
    if plan.status:
        kube.merge_patch(
            "AgentSchedule", namespace, meta["name"], {"status": plan.status}, status=True
        )
        metrics.STATUS_WRITES.inc()


def _cancel(kube: Kube, namespace: str, name: str, request: str) -> str:
    """Delete the schedule's Jobs still running, their pods first (foreground): each runner
    gets SIGTERM and reports CANCELLED with its cost so far. What was done, for the Event."""
    running = cancellable(kube.list_objects("Job", namespace, f"{LABEL_SCHEDULE}={name}"))
    deleted = [
        job for job in running if kube.delete("Job", namespace, job, propagation="Foreground")
    ]
    if not deleted:
        return f"cancel {request!r}: no run was active"
    return (
        f"cancel {request!r}: Job {', '.join(deleted)} deleted; "
        "its run ends CANCELLED with the cost so far"
    )


def failures_counted_since(status: Mapping[str, Any]) -> datetime | None:
    """Failures of runs started before the last resume do not count towards auto-pause."""
    stamp = status.get("failuresCountedSince")
    return parse_rfc3339(stamp) if stamp else None


class _Planner:
    """State of one pass's decisions (kept on an object so the steps stay small)."""

    def __init__(
        self,
        body: Mapping[str, Any],
        settings: Settings,
        now: datetime,
        *,
        stats: RunStats | None,
        run_api: RunApiEndpoint,
        prices: PriceTable | None,
        limits: Limits,
        namespace_spent: Decimal | None,
    ) -> None:
        meta = body["metadata"]
        self.limits = limits
        self.namespace_spent = namespace_spent
        self.stats = stats
        self.run_api = run_api
        self.prices = prices
        self.body = body
        self.settings = settings
        self.now = now
        self.plan = Plan(phase="")
        self.ref = ScheduleRef(meta["name"], meta["namespace"], meta["uid"])
        self.generation: int | None = meta.get("generation")
        self.annotations: Mapping[str, str] = meta.get("annotations") or {}
        self.old: dict[str, Any] = dict(body.get("status") or {})
        # Keys another pass owns keep their value unless this pass decides otherwise.
        self.new: dict[str, Any] = {k: self.old.get(k) for k in OWNED_STATUS}
        self._verification_run: str | None = None
        self._budget: tuple[str, str, str] | None = None  # (reason, message, notice key)

    def decide(
        self,
        peers: Sequence[Peer] | None,
        actual: dict[str, Any] | None,
        active: Sequence[ActiveRun] = (),
    ) -> Plan:
        self._active(active)
        cancel = self.annotations.get(ANNOTATION_CANCEL)
        if cancel and cancel != self.old.get("lastCancelRequest"):
            self.plan.cancel = cancel  # answered once: the request id goes on status
            self.new["lastCancelRequest"] = cancel
        result = validate(
            self.body,
            self.settings,
            now=self.now,
            peers=peers,
            prices=self.prices,
            limits=self.limits,
        )
        name = cronjob_name(self.ref.name)
        self.new.update(
            observedGeneration=self.generation,
            cronJobName=name if (actual is not None or result.ok) else None,
            timeZone=(self.body.get("spec") or {}).get("timeZone", "UTC"),
        )
        if result.ok and result.spec is not None:
            desired = self._valid(result, result.spec, actual)
        else:
            desired = self._invalid(result, actual)
        conditions = cond.merge(self.old.get("conditions"), desired, self.now)
        self.new.update(conditions=conditions, phase=cond.phase(conditions))
        self.plan.status = {
            k: _dropping_removed_keys(v, self.old.get(k))
            for k in OWNED_STATUS
            if (v := self.new.get(k)) != self.old.get(k)
        }
        self.plan.phase = str(self.new["phase"])
        return self.plan

    def _active(self, active: Sequence[ActiveRun]) -> None:
        """status.activeRun: the latest run in flight; a pass is due when its entry would
        expire (a runner killed without its final report)."""
        if not active:
            self.new["activeRun"] = None
            return
        latest = active[0]
        self.new["activeRun"] = latest.status(others=len(active) - 1)
        self.plan.due_by(min(run.expires_at for run in active))

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append((type_, reason, message))

    def _notice(self, kind: str, key: str, message: str) -> None:
        self.plan.notices.append((kind, key, message))

    def _invalid(self, result: Validated, actual: dict[str, Any] | None) -> list[dict[str, Any]]:
        message = "; ".join(str(e) for e in result.errors)
        quota = any("quota exceeded" in e.rule for e in result.errors)
        reason = cond.QUOTA_EXCEEDED if quota else cond.INVALID_SPEC
        # An existing CronJob is suspended, never deleted: history stays, nothing fires.
        if actual is not None and not actual.get("spec", {}).get("suspend"):
            self.plan.suspend_cronjob = actual["metadata"]["name"]
        self.new.update(nextRunAt=None, nextRunLocal=None, nextRuns=None)
        ready = cond.condition(cond.READY, False, reason, message, self.generation)
        if not self._same_condition(ready):
            self._event("Warning", reason, message)
        return [ready]

    def _valid(
        self, result: Validated, spec: AgentScheduleSpec, actual: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        ref = self.ref
        self._results(spec)
        self._budget = self._budget_state(spec)
        # Held: the CronJob stays suspended although the user did not pause the schedule.
        held = bool(self.new.get("autoPause")) or self._budget is not None
        suspend = spec.suspend or held
        cronjob = render_cronjob(
            ref,
            spec,
            self.settings,
            suspend=suspend,
            min_interval=result.min_interval,
            run_api=self.run_api,
        )
        if actual is None or not contains(actual, cronjob):
            legacy = _mounts_legacy_task(actual)
            if (
                not legacy  # an upgrade of ours, not drift
                and self.old.get("observedGeneration") == self.generation
                and self.old.get("cronJobName")
            ):
                what = "deleted" if actual is None else "changed outside Nocturne"
                self._event(
                    "Warning",
                    "DriftRepaired",
                    f"CronJob {cronjob['metadata']['name']} was {what}; restored",
                )
            self.plan.cronjob = cronjob
            if legacy:
                # Upgraded from a version whose Jobs read one shared task ConfigMap.
                self.plan.delete_configmap = legacy_task_configmap_name(ref.name)
        # The CronJob as the cluster has it once the plan is applied (apply leaves its status).
        current = actual if actual is not None else cronjob
        # A new month: its cost starts at zero on status, and a monthly hold ends.
        self.plan.due_by(next_month_start(self.now, spec.time_zone))
        self._next_runs(spec, suspended=suspend)
        silent_stop = self._silent_stop(spec, current, suspended=suspend)
        verification = self._verification_run
        if verification:
            job = self._run_now(spec, current, verification)
            self._event(
                "Normal",
                "VerificationRun",
                f"resumed after auto-pause; verification run Job {job} started",
            )
        request = self.annotations.get(ANNOTATION_RUN_NOW)
        if request and (self.old.get("lastManualRun") or {}).get("requestId") != request:
            job = self._run_now(spec, current, request)
            self.new["lastManualRun"] = {
                "requestId": request,
                "job": job,
                "createdAt": rfc3339(self.now),
            }
            self._event("Normal", "RunNow", f"run-now {request!r} started Job {job}")
        ready = cond.condition(
            cond.READY,
            True,
            cond.RECONCILED,
            f"CronJob {current['metadata']['name']} runs {spec.schedule!r} in {spec.time_zone}",
            self.generation,
        )
        return [
            ready,
            self._suspended(spec),
            self._budget_condition(spec),
            silent_stop,
            self._schedule_warning(result),
        ]

    def _next_runs(self, spec: AgentScheduleSpec, *, suspended: bool) -> None:
        if suspended:
            self.new.update(nextRunAt=None, nextRunLocal=None, nextRuns=None)
            return
        zone = ZoneInfo(spec.time_zone)
        times = cron.next_fire_times(
            cron.parse_schedule(spec.schedule), zone, self.now, self.settings.next_runs_count
        )
        runs = [cron.describe_run(t, zone) for t in times]
        if times:
            self.plan.due_by(times[0])
        self.new.update(
            nextRunAt=runs[0].utc if runs else None,
            nextRunLocal=runs[0].local if runs else None,
            nextRuns=[{"utc": r.utc, "local": r.local} for r in runs] or None,
        )

    def _suspended(self, spec: AgentScheduleSpec) -> dict[str, Any]:
        auto = self.new.get("autoPause")
        if spec.suspend:
            why = self.annotations.get(ANNOTATION_SUSPEND_REASON) or "spec.suspend is true"
            new = cond.condition(cond.SUSPENDED, True, cond.SUSPENDED_BY_USER, why, self.generation)
        elif auto:
            new = cond.condition(
                cond.SUSPENDED, True, cond.CONSECUTIVE_FAILURES, auto["message"], self.generation
            )
        else:
            new = cond.condition(cond.SUSPENDED, False, cond.NOT_SUSPENDED, "", self.generation)
        old = self._find(cond.SUSPENDED)
        if old is None or old.get("status") != new["status"]:
            if auto and not spec.suspend:
                self._event("Warning", "AutoPaused", new["message"])
                # Keyed by the failed run that tripped it: a repeated pass cannot send it twice.
                key = auto.get("job") or str(auto.get("pausedAt", ""))
                self._notice("AutoPaused", str(key), new["message"])
            elif spec.suspend:
                self._event("Normal", "Paused", f"schedule paused: {new['message']}")
            elif old is not None:
                reason = self.annotations.get(ANNOTATION_RESUME_REASON)
                message = f"schedule resumed: {reason}" if reason else "schedule resumed"
                self._event("Normal", "Resumed", message)
        return new

    def _results(self, spec: AgentScheduleSpec) -> None:
        """Run results on status, a resume request, and auto-pause."""
        resume = self.annotations.get(ANNOTATION_RESUME)
        requested = bool(resume) and resume != self.old.get("lastResumeRequest")
        if requested:
            self.new["lastResumeRequest"] = resume  # answered, whatever it finds
        # A resume restarts the failure count only where there was a pause to end (by the
        # user, or an auto-pause): on a running schedule it changes nothing.
        resumed = requested and self._was_paused()
        if resumed:
            self.new["failuresCountedSince"] = rfc3339(self.now)
            if self.old.get("autoPause"):
                # Check the cause at once instead of waiting for the next slot.
                self.new["autoPause"] = None
                self.new["pendingVerification"] = True
                self._verification_run = f"resume-{resume}"
        stats = self.stats
        if stats is None:  # no database: results and holds stay as last recorded
            return
        last = stats.last_run
        if stats.month_cost is not None:
            self.new["thisMonth"] = {
                "month": self._month(spec).strftime("%Y-%m"),
                "costUSD": usd(stats.month_cost),
            }
        self.new.update(
            totalCostUSD=usd(stats.total_cost),
            runs={"succeeded": stats.succeeded, "failed": stats.failed},
            consecutiveFailures=0 if resumed else stats.consecutive_failures,
            lastRun=None if last is None else _last_run(last),
        )
        since = failures_counted_since(self.new)
        if (
            self.new.get("pendingVerification")
            and last is not None
            and last.status is RunOutcome.SUCCEEDED
            and (since is None or last.started_at >= since)
        ):
            self.new["pendingVerification"] = None
        limit = spec.failure_policy.pause_after_consecutive_failures
        # After a resume from auto-pause, one more failure is enough: the cause is still there.
        threshold = 1 if self.new.get("pendingVerification") else limit
        streak = self.new["consecutiveFailures"]
        if not self.new.get("autoPause") and not resumed and streak >= threshold:
            self.new["autoPause"] = {
                "job": last.job_name if last is not None else None,
                "reason": cond.CONSECUTIVE_FAILURES,
                "message": f"{streak} failed runs in a row (pauseAfterConsecutiveFailures "
                f"{limit}); fix the cause, then `nocturne resume {self.ref.name}`",
                "pausedAt": rfc3339(self.now),
            }
            self.new["pendingVerification"] = None

    def _was_paused(self) -> bool:
        """Suspended by the user or auto-paused, as the last pass left it."""
        suspended = self._find(cond.SUSPENDED)
        return bool(self.old.get("autoPause")) or (
            suspended is not None and suspended.get("status") == "True"
        )

    def _month(self, spec: AgentScheduleSpec) -> datetime:
        return month_start(self.now, spec.time_zone)

    def _budget_state(self, spec: AgentScheduleSpec) -> tuple[str, str, str] | None:
        """(reason, message, notice key) when a cumulative or monthly cap is reached."""
        cap = spec.budget.max_total_usd
        if self.stats is not None:
            total: Decimal | None = self.stats.total_cost
        else:  # database unavailable: hold on to the last recorded total
            recorded = self.old.get("totalCostUSD")
            total = Decimal(recorded) if recorded else None
        if cap is not None and total is not None and total >= cap:
            return (
                cond.TOTAL_BUDGET_REACHED,
                f"total cost {usd(total)} USD reached maxTotalUSD {usd(cap)}; "
                "raise spec.budget.maxTotalUSD to resume",
                f"total:{usd(cap)}",
            )
        monthly = spec.budget.max_monthly_usd
        if monthly is None:
            return self._namespace_budget_state()
        month = self._month(spec)
        label = month.strftime("%Y-%m")
        if self.stats is not None and self.stats.month_cost is not None:
            spent = self.stats.month_cost
        else:  # database unavailable: last recorded cost of this month (a new month starts at 0)
            recorded = self.old.get("thisMonth") or {}
            spent = Decimal(recorded["costUSD"]) if recorded.get("month") == label else Decimal(0)
        if spent < monthly:
            return self._namespace_budget_state()
        zone = ZoneInfo(spec.time_zone)
        resumes = next_month_start(self.now, spec.time_zone)
        return (
            cond.MONTHLY_BUDGET_REACHED,
            f"cost in {label} {usd(spent)} USD reached maxMonthlyUSD {usd(monthly)}; resumes "
            f"automatically at {cron.describe_run(resumes, zone).local} "
            "(or raise spec.budget.maxMonthlyUSD)",
            f"monthly:{label}:{usd(monthly)}",
        )

    def _namespace_budget_state(self) -> tuple[str, str, str] | None:
        """(reason, message, notice key) when the namespace's monthly budget (an
        AgentSchedulePolicy's) is spent: every schedule of the namespace is held until the month
        turns in the budget's zone. With the database away, a hold of this month stays."""
        cap = self.limits.namespace_budget
        if cap is None:
            return None
        start = month_start(self.now, cap.time_zone)
        resumes = next_month_start(self.now, cap.time_zone)
        self.plan.due_by(resumes)
        label = start.strftime("%Y-%m")
        spent = self.namespace_spent
        if spent is None:
            old = self._find(cond.BUDGET_EXHAUSTED)
            held = (
                old is not None
                and old.get("status") == "True"
                and old.get("reason") == cond.NAMESPACE_BUDGET_REACHED
                and f" in {label} " in str(old.get("message", ""))
            )
            if not held or old is None:
                return None
            return (cond.NAMESPACE_BUDGET_REACHED, str(old["message"]), f"namespace:{label}")
        if spent < cap.max_monthly_usd:
            return None
        when = cron.describe_run(resumes, ZoneInfo(cap.time_zone)).local
        return (
            cond.NAMESPACE_BUDGET_REACHED,
            f"namespace {self.ref.namespace} spent {usd(spent)} USD in {label} "
            f"({cap.time_zone}), reaching its maxMonthlyUSD {usd(cap.max_monthly_usd)} "
            f'(AgentSchedulePolicy "{cap.policy}"); resumes automatically at {when}',
            f"namespace:{label}:{usd(cap.max_monthly_usd)}",
        )

    def _budget_condition(self, spec: AgentScheduleSpec) -> dict[str, Any]:
        if self._budget is not None:
            reason, message, key = self._budget
            new = cond.condition(cond.BUDGET_EXHAUSTED, True, reason, message, self.generation)
            if not self._same_condition(new, keys=("status", "reason")):
                self._event("Warning", "BudgetExhausted", message)
                self._notice("BudgetExceeded", key, message)
            return new
        new = cond.condition(cond.BUDGET_EXHAUSTED, False, cond.WITHIN_BUDGET, "", self.generation)
        old = self._find(cond.BUDGET_EXHAUSTED)
        if old is not None and old.get("status") == "True":
            self._event(
                "Normal",
                "BudgetAvailable",
                "within budget again (a new month began or the cap was raised); runs resume",
            )
        return new

    def _silent_stop(
        self, spec: AgentScheduleSpec, cronjob: Mapping[str, Any], *, suspended: bool
    ) -> dict[str, Any]:
        """Warn when no run has succeeded for two scheduled intervals (plus the run timeout):
        catches a CronJob that stopped firing as well as runs that never succeed."""
        if suspended:
            return cond.condition(
                cond.SILENT_STOP,
                False,
                cond.NOT_SCHEDULED,
                "the schedule is suspended",
                self.generation,
            )
        since = self._watching_since(cronjob)
        zone = ZoneInfo(spec.time_zone)
        fires = cron.next_fire_times(cron.parse_schedule(spec.schedule), zone, since, 2)
        grace = (
            timedelta(seconds=spec.timeout_seconds + (spec.starting_deadline_seconds or 0))
            + SILENT_STOP_GRACE
        )
        if len(fires) < 2 or self.now < fires[1] + grace:
            if len(fires) == 2:
                self.plan.due_by(fires[1] + grace)
            return cond.condition(
                cond.SILENT_STOP,
                False,
                cond.RUNS_SUCCEEDING,
                # No moment in this message: the one computed on the creating pass and on later
                # passes differ by seconds (the conditions' own transition times join in), and
                # a message that changes rewrites status for nothing.
                "no scheduled run is overdue for a success",
                self.generation,
            )
        due = " and ".join(cron.describe_run(t, zone).local for t in fires)
        message = (
            f"no successful run since {cron.describe_run(since, zone).local}; runs were due at "
            f"{due}; check CronJob {cronjob['metadata']['name']} and its Jobs "
            f"(kubectl get jobs -n {self.ref.namespace} -l {LABEL_SCHEDULE}={self.ref.name})"
        )
        new = cond.condition(
            cond.SILENT_STOP, True, cond.NO_SUCCESSFUL_RUN, message, self.generation
        )
        if not self._same_condition(new, keys=("status",)):
            self._event("Warning", "SilentStop", message)
            self._notice("SilentStop", rfc3339(since), message)
        return new

    def _watching_since(self, cronjob: Mapping[str, Any]) -> datetime:
        """The latest of: the last successful run, the schedule's creation, the moment its last
        hold (pause, budget, invalid spec) ended."""
        moments: list[datetime] = []
        created = self.body["metadata"].get("creationTimestamp")
        if created:
            moments.append(parse_rfc3339(created))
        if self.stats is not None and self.stats.last_success_at is not None:
            moments.append(self.stats.last_success_at)
        cron_success = (cronjob.get("status") or {}).get("lastSuccessfulTime")
        if cron_success:
            moments.append(parse_rfc3339(cron_success))
        # The end of every hold: a pause, a budget hold, an invalid spec (nothing fired then).
        for type_, held in (
            (cond.SUSPENDED, "True"),
            (cond.BUDGET_EXHAUSTED, "True"),
            (cond.READY, "False"),
        ):
            found = self._find(type_)
            if found is not None and found.get("status") == held:
                moments.append(self.now)  # the hold ends in this very pass
            elif found is not None and found.get("lastTransitionTime"):
                moments.append(parse_rfc3339(found["lastTransitionTime"]))
        if resumed := self.new.get("failuresCountedSince"):
            moments.append(parse_rfc3339(resumed))
        return max(moments, default=self.now)

    def _schedule_warning(self, result: Validated) -> dict[str, Any]:
        if not result.warnings:
            return cond.condition(
                cond.SCHEDULE_WARNING,
                False,
                cond.NO_DST_ISSUES,
                "no run falls in a DST gap or fold within a year",
                self.generation,
            )
        warning = cond.condition(
            cond.SCHEDULE_WARNING,
            True,
            cond.DST_TRANSITIONS,
            "; ".join(result.warnings[:5]),
            self.generation,
        )
        if not self._same_condition(warning):
            self._event("Warning", cond.DST_TRANSITIONS, warning["message"])
        return warning

    def _run_now(self, spec: AgentScheduleSpec, cronjob: Mapping[str, Any], request: str) -> str:
        """One Job from the CronJob's template per request id (a repeated id creates nothing);
        its owner's UID is the applied CronJob's (``apply``)."""
        ref = self.ref
        name = manual_job_name(ref.name, request)
        template = render_job_template(ref, spec, self.settings, self.run_api)
        [runner] = template["spec"]["template"]["spec"]["containers"]
        runner["env"].append({"name": ENV_MANUAL_REQUEST, "value": request})
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": ref.namespace,
                "labels": labels(ref),
                # The same marker `kubectl create job --from=cronjob/...` leaves.
                "annotations": {
                    "cronjob.kubernetes.io/instantiate": "manual",
                    ANNOTATION_MANUAL_REQUEST: request,
                },
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "CronJob",
                        "name": cronjob["metadata"]["name"],
                        "uid": cronjob["metadata"].get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        self.plan.jobs.append(job)
        return name

    def _find(self, type_: str) -> Mapping[str, Any] | None:
        return next((c for c in self.old.get("conditions") or [] if c.get("type") == type_), None)

    def _same_condition(
        self, new: Mapping[str, Any], keys: Sequence[str] = ("status", "reason", "message")
    ) -> bool:
        found = self._find(new["type"])
        return found is not None and all(found.get(k) == new[k] for k in keys)
