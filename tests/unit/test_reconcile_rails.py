"""Safety rails of the reconcile as pure decisions: the monthly budget (held, then released when
the month turns in the schedule's zone) and the silent-stop alarm, with the clock and the run
statistics given. The objects live in a dict; the real apiserver is exercised by tests/e2e."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest

from agent_runner.contract import RunOutcome
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.api import conditions as cond
from nocturne_operator.controller.active import ActiveRun
from nocturne_operator.controller.reconcile import Plan, apply, decide, reconcile
from nocturne_operator.prices import load_price_table
from nocturne_operator.render import RunApiEndpoint, cronjob_name
from nocturne_operator.schedule.validation import Limits
from nocturne_operator.settings import Settings
from nocturne_operator.storage import ExecutionRecord, RunStats

SETTINGS = Settings()
# 2026-11-26 10:00 in Tokyo.
NOW = datetime(2026, 11, 26, 1, 0, tzinfo=UTC)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class Objects:
    """Just enough of the API for one schedule's reconcile: objects by (kind, name)."""

    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[tuple[str, str, str]] = field(default_factory=list)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.items.get((kind, name))
        return copy.deepcopy(found) if found is not None else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(obj)
        stored["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        old = self.items.get((obj["kind"], obj["metadata"]["name"]))
        if old is not None and "status" in old:
            stored["status"] = old["status"]
        self.items[(obj["kind"], obj["metadata"]["name"])] = stored
        return copy.deepcopy(stored)

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, status: bool = False
    ) -> dict[str, Any]:
        self.patches.append(copy.deepcopy(patch))
        _merge(self.items[(kind, name)], patch)
        return copy.deepcopy(self.items[(kind, name)])

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.items:
            return None
        return self.apply(obj)

    def list_objects(self, kind: str, namespace: str, label_selector: str = "") -> list[Any]:
        label, _, value = label_selector.partition("=")
        return [
            copy.deepcopy(o)
            for (k, _), o in self.items.items()
            if k == kind and (o["metadata"].get("labels") or {}).get(label) == value
        ]

    def delete(self, kind: str, namespace: str, name: str, *, propagation: str) -> bool:
        self.deleted.append((kind, name, propagation))
        return self.items.pop((kind, name), None) is not None


@dataclass
class Recorder:
    events: list[tuple[str, str, str]] = field(default_factory=list)
    notices: list[tuple[str, str, str]] = field(default_factory=list)

    def event(self, _obj: Any, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def notice(self, kind: str, key: str, message: str) -> None:
        self.notices.append((kind, key, message))


def schedule(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {
            "name": "digest",
            "namespace": "research",
            "uid": "uid-digest",
            "generation": 1,
            "creationTimestamp": "2026-11-01T00:00:00Z",
        },
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "Asia/Tokyo",
            "task": {"query": "digest"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "1.00", "maxMonthlyUSD": "5.00"},
        },
    }
    body["spec"].update(spec)
    return body


def stats(month_cost: str | None = "0", last_success: datetime | None = NOW) -> RunStats:
    return RunStats(
        Decimal("12.00"),
        10,
        0,
        0,
        None,
        last_success_at=last_success,
        month_cost=None if month_cost is None else Decimal(month_cost),
    )


RUN_API = RunApiEndpoint(
    "https://127.0.0.1:8443", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
)


class Cluster:
    """One AgentSchedule, reconciled again and again as the operator would."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.objects = Objects()
        self.objects.items[("AgentSchedule", "digest")] = body
        self.seen = Recorder()
        # The namespace's limits (its AgentSchedulePolicies) and its cost this month.
        self.limits: Limits | None = None
        self.namespace_spent: Decimal | None = None
        # The first pass happens when the schedule is created, as with the operator.
        created = datetime.fromisoformat(body["metadata"]["creationTimestamp"])
        self.reconcile(stats(last_success=None), now=created)

    def reconcile(self, run_stats: RunStats | None, now: datetime = NOW) -> str:
        return self.plan(run_stats, now).phase

    def plan(
        self, run_stats: RunStats | None, now: datetime = NOW, active: Sequence[ActiveRun] = ()
    ) -> Plan:
        body = self.objects.get("AgentSchedule", "research", "digest")
        assert body is not None
        return reconcile(
            body,
            SETTINGS,
            cast(Kube, self.objects),
            events=self.seen.event,
            peers=None,
            stats=run_stats,
            notices=self.seen.notice,
            now=now,
            run_api=RUN_API,
            actual=self.objects.get("CronJob", "research", cronjob_name("digest")),
            active=active,
            limits=self.limits,
            namespace_spent=self.namespace_spent,
        )

    @property
    def status(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.objects.items[("AgentSchedule", "digest")]["status"])

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)

    @property
    def cronjob_suspended(self) -> bool:
        return bool(self.objects.items[("CronJob", "digest")]["spec"]["suspend"])


def test_monthly_cap_holds_the_schedule_until_the_month_turns_in_its_zone() -> None:
    cluster = Cluster(schedule())
    assert cluster.reconcile(stats("5.00")) == cond.PHASE_BUDGET_EXHAUSTED
    exhausted = cluster.condition(cond.BUDGET_EXHAUSTED)
    assert exhausted["reason"] == cond.MONTHLY_BUDGET_REACHED
    assert exhausted["message"] == (
        "cost in 2026-11 5.00 USD reached maxMonthlyUSD 5.00; resumes automatically at "
        "2026-12-01 00:00 JST (+09:00) (or raise spec.budget.maxMonthlyUSD)"
    )
    assert cluster.cronjob_suspended
    assert cluster.status["thisMonth"] == {"month": "2026-11", "costUSD": "5.00"}
    assert cluster.status.get("nextRunAt") is None
    assert cluster.seen.notices == [
        ("BudgetExceeded", "monthly:2026-11:5.00", exhausted["message"])
    ]
    # Idempotent: the same pass again posts nothing and changes nothing.
    before = copy.deepcopy(cluster.status)
    cluster.reconcile(stats("5.00"))
    assert cluster.status == before
    assert len(cluster.seen.notices) == 1
    assert [e[1] for e in cluster.seen.events].count("BudgetExhausted") == 1

    # One minute before midnight in Tokyo (15:00 UTC on the 30th) it is still November...
    cluster.reconcile(stats("5.00"), now=datetime(2026, 11, 30, 14, 59, tzinfo=UTC))
    assert cluster.cronjob_suspended
    # ...at midnight in Tokyo December's cost is zero: the schedule runs again by itself.
    december = datetime(2026, 11, 30, 15, 0, 30, tzinfo=UTC)
    assert cluster.reconcile(stats("0"), now=december) == cond.PHASE_ACTIVE
    assert not cluster.cronjob_suspended
    assert cluster.condition(cond.BUDGET_EXHAUSTED)["status"] == "False"
    assert cluster.status["thisMonth"] == {"month": "2026-12", "costUSD": "0.00"}
    assert ("Normal", "BudgetAvailable") in [e[:2] for e in cluster.seen.events]


def test_without_the_database_the_last_recorded_month_decides() -> None:
    cluster = Cluster(schedule())
    cluster.reconcile(stats("6.00"))
    assert cluster.reconcile(None) == cond.PHASE_BUDGET_EXHAUSTED
    december = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    assert cluster.reconcile(None, now=december) == cond.PHASE_ACTIVE


def test_a_raised_monthly_cap_releases_at_once_and_the_total_cap_still_wins() -> None:
    cluster = Cluster(schedule())
    cluster.reconcile(stats("5.00"))
    body = cluster.objects.items[("AgentSchedule", "digest")]
    body["spec"]["budget"]["maxMonthlyUSD"] = "8.00"
    body["metadata"]["generation"] = 2
    assert cluster.reconcile(stats("5.00")) == cond.PHASE_ACTIVE
    body["spec"]["budget"]["maxTotalUSD"] = "12.00"
    assert cluster.reconcile(stats("5.00")) == cond.PHASE_BUDGET_EXHAUSTED
    assert cluster.condition(cond.BUDGET_EXHAUSTED)["reason"] == cond.TOTAL_BUDGET_REACHED


def test_silent_stop_after_two_missed_intervals_once_then_clears_on_success() -> None:
    cluster = Cluster(schedule())
    last_success = datetime(2026, 11, 23, 0, 0, 5, tzinfo=UTC)  # 09:00:05 JST on the 23rd
    # Runs were due at 09:00 on the 24th and the 25th; 25th 09:00 + timeout 600 s + 5 min grace.
    just_before = datetime(2026, 11, 25, 0, 14, 59, tzinfo=UTC)
    cluster.reconcile(stats(last_success=last_success), now=just_before)
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    assert cluster.seen.notices == []
    after = datetime(2026, 11, 25, 0, 15, 1, tzinfo=UTC)
    cluster.reconcile(stats(last_success=last_success), now=after)
    alarm = cluster.condition(cond.SILENT_STOP)
    assert alarm["status"] == "True"
    assert alarm["reason"] == cond.NO_SUCCESSFUL_RUN
    assert alarm["message"].startswith(
        "no successful run since 2026-11-23 09:00 JST (+09:00); runs were due at "
        "2026-11-24 09:00 JST (+09:00) and 2026-11-25 09:00 JST (+09:00)"
    )
    assert cluster.reconcile(stats(last_success=last_success), now=NOW) == cond.PHASE_ACTIVE
    assert [n[:2] for n in cluster.seen.notices] == [("SilentStop", "2026-11-23T00:00:05Z")]
    assert [e[1] for e in cluster.seen.events].count("SilentStop") == 1
    cluster.reconcile(stats(last_success=NOW - timedelta(minutes=1)), now=NOW)
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"


def test_silent_stop_counts_intervals_across_a_dst_change() -> None:
    """02:30 does not exist in Berlin on 2026-03-29, and robfig/cron (like the CronJob
    controller) skips that day's run; the alarm waits for the run on the 30th instead of
    ringing after a naive 48 hours."""
    body = schedule(schedule="30 2 * * *", timeZone="Europe/Berlin")
    body["metadata"]["creationTimestamp"] = "2026-03-01T00:00:00Z"
    cluster = Cluster(body)
    last_success = datetime(2026, 3, 27, 1, 30, 5, tzinfo=UTC)  # 02:30 CET on the 27th
    naive_deadline = last_success + timedelta(hours=48, minutes=16)
    cluster.reconcile(stats(last_success=last_success), now=naive_deadline)
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    # Due: 02:30 CET on the 28th and 02:30 CEST on the 30th (00:30 UTC), + 600 s + 5 min.
    cluster.reconcile(
        stats(last_success=last_success), now=datetime(2026, 3, 30, 0, 44, tzinfo=UTC)
    )
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    cluster.reconcile(
        stats(last_success=last_success), now=datetime(2026, 3, 30, 0, 46, tzinfo=UTC)
    )
    alarm = cluster.condition(cond.SILENT_STOP)
    assert alarm["status"] == "True", alarm
    assert "2026-03-28 02:30 CET (+01:00) and 2026-03-30 02:30 CEST (+02:00)" in alarm["message"]


@pytest.mark.parametrize("why", ["user", "budget"])
def test_no_silent_stop_while_suspended(why: str) -> None:
    body = schedule(suspend=True) if why == "user" else schedule()
    cluster = Cluster(body)
    month = "9.00" if why == "budget" else "0"
    cluster.reconcile(stats(month, last_success=None), now=NOW + timedelta(days=30))
    assert cluster.condition(cond.SILENT_STOP)["reason"] == cond.NOT_SCHEDULED
    expected = ["BudgetExceeded"] if why == "budget" else []
    assert [n[0] for n in cluster.seen.notices] == expected


def test_a_resume_restarts_the_silent_stop_clock() -> None:
    cluster = Cluster(schedule(suspend=True))
    cluster.reconcile(stats(last_success=None), now=NOW)
    body = cluster.objects.items[("AgentSchedule", "digest")]
    body["spec"]["suspend"] = False
    later = NOW + timedelta(days=20)
    cluster.reconcile(stats(last_success=None), now=later)
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    cluster.reconcile(stats(last_success=None), now=later + timedelta(days=1))
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    cluster.reconcile(stats(last_success=None), now=later + timedelta(days=3))
    assert cluster.condition(cond.SILENT_STOP)["status"] == "True"


def test_the_end_of_a_budget_hold_restarts_the_silent_stop_clock() -> None:
    """Held by the monthly cap from the 20th: nothing could fire, so the month turn must not
    ring the alarm over the runs the hold skipped."""
    cluster = Cluster(schedule())
    last_success = datetime(2026, 11, 19, 0, 0, 5, tzinfo=UTC)
    held_at = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
    cluster.reconcile(stats("5.00", last_success=last_success), now=held_at)
    assert cluster.condition(cond.BUDGET_EXHAUSTED)["status"] == "True"
    december = datetime(2026, 11, 30, 15, 0, 30, tzinfo=UTC)
    cluster.reconcile(stats("0", last_success=last_success), now=december)
    assert cluster.condition(cond.BUDGET_EXHAUSTED)["status"] == "False"
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    cluster.reconcile(stats("0", last_success=last_success), now=december + timedelta(hours=1))
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    assert [n[0] for n in cluster.seen.notices] == ["BudgetExceeded"]
    # Two December runs missed: now it rings.
    cluster.reconcile(stats("0", last_success=last_success), now=december + timedelta(days=2))
    assert cluster.condition(cond.SILENT_STOP)["status"] == "True"


# ---- when the clock calls for the next pass -------------------------------------------------


def test_a_pass_is_due_again_when_its_next_slot_passes() -> None:
    cluster = Cluster(schedule())
    # 10:00 in Tokyo on the 26th: the next run is 09:00 JST on the 27th.
    assert cluster.plan(stats(), now=NOW).due == datetime(2026, 11, 27, 0, 0, tzinfo=UTC)
    assert cluster.status["nextRunAt"] == "2026-11-27T00:00:00Z"


def test_a_pass_is_due_at_the_silent_stop_deadline_before_the_next_slot() -> None:
    """Runs were due on the 24th and 25th at 09:00 JST: the alarm rings at 09:15 on the 25th,
    before the next slot, and the pass that rings it is due at that slot again."""
    cluster = Cluster(schedule())
    last_success = datetime(2026, 11, 23, 0, 0, 5, tzinfo=UTC)
    before = datetime(2026, 11, 25, 0, 10, tzinfo=UTC)
    deadline = datetime(2026, 11, 25, 0, 15, tzinfo=UTC)
    assert cluster.plan(stats(last_success=last_success), now=before).due == deadline
    assert cluster.condition(cond.SILENT_STOP)["status"] == "False"
    after = cluster.plan(stats(last_success=last_success), now=deadline + timedelta(seconds=1))
    assert cluster.condition(cond.SILENT_STOP)["status"] == "True"
    assert after.due == datetime(2026, 11, 26, 0, 0, tzinfo=UTC)


def test_a_held_schedule_is_due_when_the_month_turns_in_its_zone() -> None:
    """Held by the monthly cap there is no next slot: the month's turn at midnight in Tokyo
    (15:00 UTC on the 30th) is the moment the hold ends."""
    cluster = Cluster(schedule())
    plan = cluster.plan(stats("5.00"), now=NOW)
    assert plan.phase == cond.PHASE_BUDGET_EXHAUSTED
    assert plan.due == datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


def test_a_paused_schedule_waits_only_for_the_month_turn() -> None:
    cluster = Cluster(schedule(suspend=True))
    assert cluster.plan(stats(), now=NOW).due == datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


def test_an_invalid_schedule_waits_on_no_clock() -> None:
    cluster = Cluster(schedule(schedule="*/5 * * * *"))
    assert cluster.plan(stats(), now=NOW).due is None


def _last(
    status: RunOutcome, error: str | None, job_name: str = "digest-29400001"
) -> ExecutionRecord:
    """The schedule's last run, ended a few minutes before NOW with ``status``."""
    return ExecutionRecord(
        id=3,
        namespace="research",
        schedule_name="digest",
        schedule_uid="uid-digest",
        job_name=job_name,
        job_uid="uid-job-3",
        pod_uid="uid-pod-3",
        attempt=0,
        manual_request=None,
        status=status,
        started_at=NOW - timedelta(minutes=5),
        completed_at=NOW - timedelta(minutes=4),
        cost_usd=Decimal(0),
        input_tokens=0,
        output_tokens=0,
        model="offline-demo",
        provider="offline",
        error=error,
        output=None,
        alert=False,
        alert_reason=None,
        metadata={},
        updated_at=NOW,
    )


# ---- pause and resume, exactly -------------------------------------------------------------


def annotate(cluster: Cluster, **annotations: str) -> None:
    body = cluster.objects.items[("AgentSchedule", "digest")]
    body["metadata"].setdefault("annotations", {}).update(
        {f"nocturne.dev/{k.replace('_', '-')}": v for k, v in annotations.items()}
    )


def test_a_resume_of_a_schedule_that_is_not_paused_changes_nothing() -> None:
    """Today's request is answered (recorded, so it is not taken up again) and nothing else:
    the failure count is not restarted, no Event, no run."""
    cluster = Cluster(schedule(failurePolicy={"pauseAfterConsecutiveFailures": 3}))
    last = _last(RunOutcome.FAILED, "boom")
    failing = RunStats(Decimal("0.02"), 0, 2, 2, last, month_cost=Decimal("0.02"))
    cluster.reconcile(failing)
    before = copy.deepcopy(cluster.status)
    events = len(cluster.seen.events)
    annotate(cluster, resume="r1")
    cluster.reconcile(failing, now=NOW + timedelta(minutes=1))
    assert cluster.status == {**before, "lastResumeRequest": "r1"}
    assert cluster.status["consecutiveFailures"] == 2
    assert "failuresCountedSince" not in cluster.status
    assert len(cluster.seen.events) == events
    assert [k for k in cluster.objects.items if k[0] == "Job"] == []


def test_a_resume_says_why_and_a_paused_schedule_resumes_once() -> None:
    cluster = Cluster(schedule(suspend=True))
    annotate(cluster, suspend_reason="audit")
    cluster.reconcile(stats())
    assert cluster.condition(cond.SUSPENDED)["message"] == "audit"
    body = cluster.objects.items[("AgentSchedule", "digest")]
    body["spec"]["suspend"] = False
    del body["metadata"]["annotations"]["nocturne.dev/suspend-reason"]
    annotate(cluster, resume="r2", resume_reason="audit done")
    cluster.reconcile(stats(), now=NOW + timedelta(minutes=1))
    resumed = [e for e in cluster.seen.events if e[1] == "Resumed"]
    assert resumed == [("Normal", "Resumed", "schedule resumed: audit done")]
    assert cluster.status["failuresCountedSince"] == "2026-11-26T01:01:00Z"
    # The same request seen again (the next pass, or a restart) resumes nothing more.
    after = copy.deepcopy(cluster.status)
    cluster.reconcile(stats(), now=NOW + timedelta(minutes=2))
    assert cluster.status == after
    assert [e[1] for e in cluster.seen.events].count("Resumed") == 1


def test_a_failed_verification_run_after_a_resume_pauses_again_at_once() -> None:
    """Auto-paused after two failures; resumed: one verification run starts at once and the
    threshold is one failure; it fails, so the schedule is auto-paused again (a new notice,
    keyed by the verification run)."""
    cluster = Cluster(schedule(failurePolicy={"pauseAfterConsecutiveFailures": 2}))
    tripped = _last(RunOutcome.FAILED, "boom", job_name="digest-29400000")
    cluster.reconcile(RunStats(Decimal("0.02"), 0, 2, 2, tripped, month_cost=Decimal("0.02")))
    assert cluster.status["autoPause"]["job"] == "digest-29400000"
    assert cluster.cronjob_suspended

    resumed_at = NOW + timedelta(minutes=10)
    annotate(cluster, resume="r1")
    # The statistics as the operator reads them after the resume: failures before it do not
    # count (failures_since), the last run is still the one that tripped the pause.
    cluster.reconcile(RunStats(Decimal("0.02"), 0, 2, 0, tripped), now=resumed_at)
    assert "autoPause" not in cluster.status
    assert cluster.status["pendingVerification"] is True
    [verification] = [k[1] for k in cluster.objects.items if k[0] == "Job"]
    assert not cluster.cronjob_suspended

    failed = replace(
        _last(RunOutcome.FAILED, "still broken", job_name=verification),
        started_at=resumed_at + timedelta(seconds=5),
        completed_at=resumed_at + timedelta(seconds=30),
    )
    later = resumed_at + timedelta(minutes=1)
    cluster.reconcile(RunStats(Decimal("0.03"), 0, 3, 1, failed), now=later)
    assert cluster.status["autoPause"]["job"] == verification
    assert "1 failed runs in a row" in cluster.status["autoPause"]["message"]
    assert "pendingVerification" not in cluster.status
    assert cluster.cronjob_suspended
    assert cluster.condition(cond.SUSPENDED)["reason"] == cond.CONSECUTIVE_FAILURES
    assert [n[:2] for n in cluster.seen.notices if n[0] == "AutoPaused"] == [
        ("AutoPaused", "digest-29400000"),
        ("AutoPaused", verification),
    ]
    assert [e[1] for e in cluster.seen.events].count("AutoPaused") == 2


def test_a_cancel_deletes_the_running_jobs_once_and_says_so() -> None:
    """Foreground, so the pods go first and each runner gets SIGTERM; a finished Job stays
    (its history is kept); the request is answered once; a later request with nothing running
    says so."""
    cluster = Cluster(schedule())
    labels = {"nocturne.dev/schedule": "digest"}
    done = {"conditions": [{"type": "Complete", "status": "True"}]}
    for name, status in (("digest-run-1", {}), ("digest-29400000", done)):
        cluster.objects.items[("Job", name)] = {
            "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "status": status,
        }
    annotate(cluster, cancel="c1")
    cluster.reconcile(stats(), now=NOW + timedelta(minutes=1))
    assert cluster.objects.deleted == [("Job", "digest-run-1", "Foreground")]
    assert ("Job", "digest-29400000") in cluster.objects.items
    assert cluster.status["lastCancelRequest"] == "c1"
    cancelled = [e for e in cluster.seen.events if e[1] == "RunCancelled"]
    assert cancelled == [
        (
            "Normal",
            "RunCancelled",
            "cancel 'c1': Job digest-run-1 deleted; its run ends CANCELLED with the cost so far",
        )
    ]
    cluster.reconcile(stats(), now=NOW + timedelta(minutes=2))  # the same request again
    assert len(cluster.objects.deleted) == 1
    annotate(cluster, cancel="c2")
    cluster.reconcile(stats(), now=NOW + timedelta(minutes=3))
    assert cluster.seen.events[-1] == ("Normal", "RunCancelled", "cancel 'c2': no run was active")
    assert cluster.status["consecutiveFailures"] == 0  # a cancel is no failure


def test_an_auto_pause_is_keyed_by_the_run_that_tripped_it() -> None:
    """Two passes on either side of a second boundary write different pausedAt stamps; the
    notice key is the failed Job, so one notice is queued, not two."""
    cluster = Cluster(schedule(failurePolicy={"pauseAfterConsecutiveFailures": 2}))
    last = _last(RunOutcome.FAILED, "boom", job_name="digest-29400000")
    failed = RunStats(Decimal("0.02"), 0, 2, 2, last, month_cost=Decimal("0.02"))
    body = copy.deepcopy(cluster.objects.items[("AgentSchedule", "digest")])
    for second in (0, 1):
        # Two passes that both start from the status before the pause was written.
        cluster.objects.items[("AgentSchedule", "digest")] = copy.deepcopy(body)
        cluster.reconcile(failed, now=NOW + timedelta(seconds=second))
    assert cluster.status["autoPause"]["job"] == "digest-29400000"
    assert [n[:2] for n in cluster.seen.notices] == [
        ("AutoPaused", "digest-29400000"),
        ("AutoPaused", "digest-29400000"),
    ]


def test_last_run_says_why_a_run_did_not_succeed_and_nothing_when_it_did() -> None:
    """A run without a budget grant spent nothing; status says why (the error's first line,
    bounded). A success carries no message key, so a second pass writes nothing."""
    cluster = Cluster(schedule())
    error = "no budget grant: run API unavailable: HTTP 503 HistoryUnavailable\n" + "x" * 900
    refused = _last(RunOutcome.FAILED, error)
    cluster.reconcile(RunStats(Decimal(0), 0, 1, 1, refused, month_cost=Decimal(0)))
    message = cluster.status["lastRun"]["message"]
    assert message == "no budget grant: run API unavailable: HTTP 503 HistoryUnavailable"
    long = _last(RunOutcome.BUDGET_EXCEEDED, "y" * 1000)
    cluster.reconcile(RunStats(Decimal(0), 0, 1, 1, long, month_cost=Decimal(0)))
    assert len(cluster.status["lastRun"]["message"]) == 256
    ok = _last(RunOutcome.SUCCEEDED, None)
    cluster.reconcile(RunStats(Decimal(0), 1, 1, 0, ok, month_cost=Decimal(0)))
    assert "message" not in cluster.status["lastRun"]
    writes = len(cluster.objects.patches)
    cluster.reconcile(RunStats(Decimal(0), 1, 1, 0, ok, month_cost=Decimal(0)))
    assert len(cluster.objects.patches) == writes


def test_a_sweep_after_a_late_first_pass_writes_no_status() -> None:
    """The creating pass may run a minute after creationTimestamp (a busy operator); its
    conditions' transition times then differ from creationTimestamp, and a SilentStop message
    that named the moment watched from changed on the next sweep: every schedule's status was
    written again for nothing (issue 18)."""
    body = schedule()
    body["metadata"]["creationTimestamp"] = "2026-11-26T00:58:30Z"
    objects = Objects()
    objects.items[("AgentSchedule", "digest")] = body
    cluster = Cluster.__new__(Cluster)
    cluster.objects, cluster.seen = objects, Recorder()
    cluster.limits, cluster.namespace_spent = None, None
    cluster.reconcile(stats(last_success=None), now=NOW - timedelta(seconds=5))  # 00:59:55
    writes = len(objects.patches)
    for later in (timedelta(minutes=1), timedelta(minutes=7)):
        cluster.reconcile(stats(last_success=None), now=NOW + later)
    assert len(objects.patches) == writes, objects.patches[writes:]


def test_a_model_without_a_price_is_refused_before_any_run() -> None:
    """Every run of such a schedule would fail with a configuration error: the operator says
    so on Ready with the field and the rule, and suspends nothing it did not create."""
    body = schedule(agent={"model": "gpt-9-imaginary", "provider": "openai"})
    body["spec"]["agent"]["apiKeySecretRef"] = {"name": "llm-credentials", "key": "key"}
    objects = Objects()
    objects.items[("AgentSchedule", "digest")] = body
    reconcile(
        body,
        SETTINGS,
        cast(Kube, objects),
        events=Recorder().event,
        peers=None,
        stats=None,
        now=NOW,
        run_api=RUN_API,
        prices=load_price_table(),
        actual=None,  # no CronJob yet
    )
    status = objects.items[("AgentSchedule", "digest")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert 'spec.agent.model "gpt-9-imaginary": no price for provider "openai"' in ready["message"]
    assert ("CronJob", "digest") not in objects.items


# ---- decide, then apply -------------------------------------------------------------------------


def test_decide_plans_and_apply_carries_out_then_nothing_is_left_to_do() -> None:
    """``decide`` is pure (no client at all); what it plans for a new schedule with a run-now
    request is applied in order, and deciding again over the result plans nothing."""
    body = schedule()
    body["metadata"]["annotations"] = {"nocturne.dev/run-now": "r1"}

    def plan_now(current: dict[str, Any], cronjob: dict[str, Any] | None) -> Plan:
        return decide(
            current,
            SETTINGS,
            cronjob,
            now=NOW,
            peers=None,
            stats=stats(),
            run_api=RUN_API,
            prices=load_price_table(None),
        )

    first = plan_now(body, None)
    assert first.cronjob is not None
    assert first.cronjob["metadata"]["name"] == "digest"
    [job] = first.jobs
    assert job["metadata"]["ownerReferences"][0]["name"] == "digest"
    assert ("Normal", "RunNow", f"run-now 'r1' started Job {job['metadata']['name']}") in (
        first.events
    )
    assert first.status["phase"] == first.phase == "Active"
    assert first.status["lastManualRun"]["requestId"] == "r1"

    objects = Objects()
    objects.items[("AgentSchedule", "digest")] = copy.deepcopy(body)
    seen = Recorder()
    apply(first, body, None, cast(Kube, objects), events=seen.event, notices=seen.notice)
    cronjob = objects.get("CronJob", "research", "digest")
    created = objects.get("Job", "research", job["metadata"]["name"])
    assert cronjob is not None
    assert created is not None
    # The Job is owned by the CronJob the same apply created, by its UID.
    assert created["metadata"]["ownerReferences"][0]["uid"] == cronjob["metadata"]["uid"]
    assert seen.events == first.events

    current = objects.get("AgentSchedule", "research", "digest")
    assert current is not None
    again = plan_now(current, cronjob)
    # Nothing to write: only the moment of the next pass (the next slot, 09:00 JST on the 27th).
    assert again == Plan(phase="Active", due=datetime(2026, 11, 27, 0, 0, tzinfo=UTC))


def test_apply_queues_notices_and_events_before_status() -> None:
    """Status is what tells the next pass that a notice went out: a pass that dies after the
    objects but before status is repeated whole (the outbox dedupes the notice by its key),
    instead of flipping the condition and losing the AutoPaused notice for good."""
    body = schedule()
    objects = Objects()
    objects.items[("AgentSchedule", "digest")] = copy.deepcopy(body)
    seen = Recorder()
    plan = Plan(
        phase="Suspended",
        notices=[("AutoPaused", "job-1", "3 failed runs in a row")],
        events=[("Warning", "AutoPaused", "3 failed runs in a row")],
        status={"phase": "Suspended"},
    )

    def dying(_obj: Any, type_: str, reason: str, message: str) -> None:
        raise SystemExit("the operator is killed here")

    with pytest.raises(SystemExit):
        apply(plan, body, None, cast(Kube, objects), events=dying, notices=seen.notice)
    assert seen.notices == [("AutoPaused", "job-1", "3 failed runs in a row")]
    assert objects.patches == []  # status untouched: the next pass decides the same again
    apply(plan, body, None, cast(Kube, objects), events=seen.event, notices=seen.notice)
    assert objects.patches == [{"status": {"phase": "Suspended"}}]
    assert seen.events == [("Warning", "AutoPaused", "3 failed runs in a row")]
