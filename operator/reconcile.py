"""The one reconcile: AgentSchedule -> task ConfigMap + CronJob + status.

Called for create, update, resume, the periodic drift timer and events of the owned CronJob.
Idempotent: a second call with nothing changed writes nothing (objects are compared with their
rendering before any write, and status is patched only where it differs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from nocturne_operator import conditions as cond
from nocturne_operator import cron
from nocturne_operator.api import AgentScheduleSpec
from nocturne_operator.kube import Kube
from nocturne_operator.render import (
    ANNOTATION_MANUAL_REQUEST,
    ScheduleRef,
    cronjob_name,
    labels,
    manual_job_name,
    render_cronjob,
    render_job_template,
    render_task_configmap,
)
from nocturne_operator.settings import Settings
from nocturne_operator.validation import Peer, Validated, validate

log = logging.getLogger(__name__)

ANNOTATION_RUN_NOW = "nocturne.dev/run-now"
ANNOTATION_SUSPEND_REASON = "nocturne.dev/suspend-reason"
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
)

EventSink = Callable[[Mapping[str, Any], str, str, str], None]
"""(object, type Normal|Warning, reason, message) -> None"""


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


def reconcile(
    body: Mapping[str, Any],
    settings: Settings,
    kube: Kube,
    *,
    events: EventSink,
    peers: Sequence[Peer] | None,
    now: datetime | None = None,
) -> None:
    """Bring the CronJob, its task ConfigMap and the status in line with the AgentSchedule."""
    _Reconciler(body, settings, kube, events, now or datetime.now(UTC)).run(peers)


class _Reconciler:
    """State of one reconcile pass (kept on an object so the steps stay small)."""

    def __init__(
        self,
        body: Mapping[str, Any],
        settings: Settings,
        kube: Kube,
        events: EventSink,
        now: datetime,
    ) -> None:
        meta = body["metadata"]
        self.body = body
        self.settings = settings
        self.kube = kube
        self.events = events
        self.now = now
        self.ref = ScheduleRef(meta["name"], meta["namespace"], meta["uid"])
        self.generation: int | None = meta.get("generation")
        self.annotations: Mapping[str, str] = meta.get("annotations") or {}
        self.old: dict[str, Any] = dict(body.get("status") or {})
        self.new: dict[str, Any] = {"lastManualRun": self.old.get("lastManualRun")}

    def run(self, peers: Sequence[Peer] | None) -> None:
        result = validate(self.body, self.settings, now=self.now, peers=peers)
        name = cronjob_name(self.ref.name)
        actual = self.kube.get("CronJob", self.ref.namespace, name)
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
        patch = {k: v for k in OWNED_STATUS if (v := self.new.get(k)) != self.old.get(k)}
        if patch:
            self.kube.merge_patch(
                "AgentSchedule", self.ref.namespace, self.ref.name, {"status": patch}, status=True
            )

    def _invalid(self, result: Validated, actual: dict[str, Any] | None) -> list[dict[str, Any]]:
        message = "; ".join(str(e) for e in result.errors)
        quota = any("quota exceeded" in e.rule for e in result.errors)
        reason = cond.QUOTA_EXCEEDED if quota else cond.INVALID_SPEC
        # An existing CronJob is suspended, never deleted: history stays, nothing fires.
        if actual is not None and not actual.get("spec", {}).get("suspend"):
            self.kube.merge_patch(
                "CronJob",
                self.ref.namespace,
                actual["metadata"]["name"],
                {"spec": {"suspend": True}},
            )
        self.new.update(nextRunAt=None, nextRunLocal=None, nextRuns=None)
        ready = cond.condition(cond.READY, False, reason, message, self.generation)
        if not self._same_condition(ready):
            self.events(self.body, "Warning", reason, message)
        return [ready]

    def _valid(
        self, result: Validated, spec: AgentScheduleSpec, actual: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        ref, kube = self.ref, self.kube
        configmap = render_task_configmap(ref, spec)
        current_cm = kube.get("ConfigMap", ref.namespace, configmap["metadata"]["name"])
        if current_cm is None or not contains(current_cm, configmap):
            kube.apply(configmap)
        cronjob = render_cronjob(
            ref, spec, self.settings, suspend=spec.suspend, min_interval=result.min_interval
        )
        if actual is None or not contains(actual, cronjob):
            if self.old.get("observedGeneration") == self.generation and self.old.get(
                "cronJobName"
            ):
                what = "deleted" if actual is None else "changed outside Nocturne"
                self.events(
                    self.body,
                    "Warning",
                    "DriftRepaired",
                    f"CronJob {cronjob['metadata']['name']} was {what}; restored",
                )
            actual = kube.apply(cronjob)
        self._next_runs(spec)
        request = self.annotations.get(ANNOTATION_RUN_NOW)
        if request and (self.old.get("lastManualRun") or {}).get("requestId") != request:
            job = self._run_now(spec, actual, request)
            self.new["lastManualRun"] = {
                "requestId": request,
                "job": job,
                "createdAt": self.now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            self.events(self.body, "Normal", "RunNow", f"run-now {request!r} started Job {job}")
        ready = cond.condition(
            cond.READY,
            True,
            cond.RECONCILED,
            f"CronJob {actual['metadata']['name']} runs {spec.schedule!r} in {spec.time_zone}",
            self.generation,
        )
        return [ready, self._suspended(spec), self._schedule_warning(result)]

    def _next_runs(self, spec: AgentScheduleSpec) -> None:
        if spec.suspend:
            self.new.update(nextRunAt=None, nextRunLocal=None, nextRuns=None)
            return
        zone = ZoneInfo(spec.time_zone)
        times = cron.next_fire_times(
            cron.parse_schedule(spec.schedule), zone, self.now, self.settings.next_runs_count
        )
        runs = [cron.describe_run(t, zone) for t in times]
        self.new.update(
            nextRunAt=runs[0].utc if runs else None,
            nextRunLocal=runs[0].local if runs else None,
            nextRuns=[{"utc": r.utc, "local": r.local} for r in runs] or None,
        )

    def _suspended(self, spec: AgentScheduleSpec) -> dict[str, Any]:
        if spec.suspend:
            why = self.annotations.get(ANNOTATION_SUSPEND_REASON) or "spec.suspend is true"
            new = cond.condition(cond.SUSPENDED, True, cond.SUSPENDED_BY_USER, why, self.generation)
        else:
            new = cond.condition(cond.SUSPENDED, False, cond.NOT_SUSPENDED, "", self.generation)
        old = self._find(cond.SUSPENDED)
        if old is None or old.get("status") != new["status"]:
            if spec.suspend:
                self.events(self.body, "Normal", "Paused", f"schedule paused: {new['message']}")
            elif old is not None:
                self.events(self.body, "Normal", "Resumed", "schedule resumed")
        return new

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
            self.events(self.body, "Warning", cond.DST_TRANSITIONS, warning["message"])
        return warning

    def _run_now(self, spec: AgentScheduleSpec, cronjob: Mapping[str, Any], request: str) -> str:
        """One Job from the CronJob's template per request id (a repeated id creates nothing)."""
        ref = self.ref
        name = manual_job_name(ref.name, request)
        template = render_job_template(ref, spec, self.settings)
        [runner] = template["spec"]["template"]["spec"]["containers"]
        runner["env"].append({"name": "NOCTURNE_MANUAL_REQUEST", "value": request})
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
                        "uid": cronjob["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        if self.kube.create(job) is None:
            log.info("run-now %s: Job %s/%s already exists", request, ref.namespace, name)
        return name

    def _find(self, type_: str) -> Mapping[str, Any] | None:
        return next((c for c in self.old.get("conditions") or [] if c.get("type") == type_), None)

    def _same_condition(self, new: Mapping[str, Any]) -> bool:
        found = self._find(new["type"])
        return found is not None and all(
            found.get(k) == new[k] for k in ("status", "reason", "message")
        )
