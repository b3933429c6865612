"""The operator against the real control plane: AgentSchedule -> CronJob, status, pause/resume,
run-now, drift repair, deletion, and invalid input at apply time (CEL) and on status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent_runner.contract import RunOutcome
from e2e.conftest import OperatorProcess
from e2e.schedules import (
    condition,
    finished_job,
    nocturne_cli,
    patch_spec,
    ready,
    run_now,
    runner_summary,
    schedule,
    status_of,
)
from harness.kube import Cluster, Kubectl, wait_for
from integration.llm_server import Reply, ScriptedServer, html_page
from nocturne_operator.storage import ExecutionKey, History

pytestmark = pytest.mark.e2e


def manifest(name: str = "daily-ai-news", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "Asia/Tokyo",
            "task": {"query": "Generate a daily news digest about AI"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "2.00"},
            "timeoutSeconds": 600,
            "retries": 2,
        },
    }
    body["spec"].update(spec)
    return body


def cronjob(kubectl: Kubectl, namespace: str, name: str = "daily-ai-news") -> dict[str, Any] | None:
    out = kubectl("get", "cronjob", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out) if out else None


def events(kubectl: Kubectl, namespace: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in kubectl.items("events", "-n", namespace) if e.get("reason") == reason]


def test_valid_schedule_becomes_a_cronjob_with_status(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    obj = wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    cj = cronjob(kubectl, namespace)
    assert cj is not None
    spec = cj["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["suspend"]) == (
        "0 9 * * *",
        "Asia/Tokyo",
        False,
    )
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 600
    assert job["backoffLimit"] == 2
    assert job["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    pod = job["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert cj["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]

    status = obj["status"]
    assert status["phase"] == "Active"
    assert status["cronJobName"] == "daily-ai-news"
    assert status["timeZone"] == "Asia/Tokyo"
    assert status["nextRunAt"].endswith("T00:00:00Z")  # 09:00 JST
    assert "09:00 JST" in status["nextRunLocal"]
    assert len(status["nextRuns"]) == 5
    assert "kopf" not in status  # kopf keeps its bookkeeping in nocturne.dev annotations
    table = kubectl("get", "asched", "-n", namespace)
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "SCHEDULE", "ZONE", "SUSPENDED"]
    assert "Asia/Tokyo" in row
    assert "JST" in row
    assert "Active" in row
    assert kubectl("get", "nocturne", "-n", namespace).strip()  # category


def test_update_is_applied_and_generation_observed(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    kubectl.apply(namespace, manifest(schedule="30 7 * * 1-5", timeoutSeconds=300, retries=0))
    obj = wait_for(lambda: ready(kubectl, namespace), 30, "the update to be observed")
    assert obj["metadata"]["generation"] == 2
    cj = cronjob(kubectl, namespace)
    assert cj is not None
    assert cj["spec"]["schedule"] == "30 7 * * 1-5"
    assert cj["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 300
    assert cj["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert "07:30 JST" in obj["status"]["nextRunLocal"]


def test_reconcile_is_idempotent(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    """Once settled, another reconcile (from a CronJob event or an AgentSchedule update that does
    not touch the spec) writes nothing: no CronJob change, no status change."""
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")

    def snapshot() -> tuple[str, dict[str, Any]]:
        cj = cronjob(kubectl, namespace)
        assert cj is not None
        return cj["metadata"]["resourceVersion"], schedule(kubectl, namespace)["status"]

    seen: list[tuple[str, dict[str, Any]]] = []

    def settled() -> tuple[str, dict[str, Any]] | None:
        seen.append(snapshot())
        return seen[-1] if len(seen) > 1 and seen[-1] == seen[-2] else None

    wait_for(settled, 30, "the objects to settle", interval=2)
    # A CronJob event: the operator reconciles the owner again.
    kubectl("label", "-n", namespace, "cronjob/daily-ai-news", "example.com/touched=1")
    after_label = snapshot()
    # An AgentSchedule update without a spec change: the operator reconciles it again.
    touched = time.time()
    kubectl("label", "-n", namespace, "asched/daily-ai-news", "example.com/touched=1")
    wait_for(
        lambda: reconciled_at(operator, namespace, "daily-ai-news") > touched,
        15,
        "a reconcile after the label",
    )
    time.sleep(2)
    assert snapshot() == after_label


def reconciled_at(operator: OperatorProcess, namespace: str, name: str) -> float:
    """When the operator last reconciled the schedule (its metric; 0: never)."""
    labels = f'namespace="{namespace}",schedule="{name}"'
    pattern = rf"^nocturne_schedule_reconciled_timestamp_seconds\{{{labels}\}} (\S+)$"
    found = re.search(pattern, operator.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_pause_and_resume_round_trip_with_a_reason(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    kubectl(
        "annotate",
        "-n",
        namespace,
        "asched/daily-ai-news",
        "nocturne.dev/suspend-reason=holiday freeze",
    )
    patch_spec(kubectl, namespace, {"suspend": True})

    def paused() -> dict[str, Any] | None:
        obj = ready(kubectl, namespace)
        cj = cronjob(kubectl, namespace)
        return obj if obj and cj and cj["spec"]["suspend"] else None

    obj = wait_for(paused, 30, "the CronJob to be suspended")
    cond = condition(obj, "Suspended")
    assert cond is not None
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "True",
        "SuspendedByUser",
        "holiday freeze",
    )
    assert obj["status"]["phase"] == "Suspended"
    assert "nextRunAt" not in obj["status"]
    assert wait_for(lambda: events(kubectl, namespace, "Paused"), 15, "a Paused event")

    patch_spec(kubectl, namespace, {"suspend": False})

    def resumed() -> dict[str, Any] | None:
        cj = cronjob(kubectl, namespace)
        return ready(kubectl, namespace) if cj and not cj["spec"]["suspend"] else None

    obj = wait_for(resumed, 30, "the schedule to resume")
    assert obj["status"]["phase"] == "Active"
    assert wait_for(lambda: events(kubectl, namespace, "Resumed"), 15, "a Resumed event")


def test_run_now_creates_exactly_one_job_per_request(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest(suspend=True))  # allowed while suspended
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")

    def jobs() -> list[dict[str, Any]]:
        return kubectl.items("jobs", "-n", namespace, "-l", "nocturne.dev/schedule=daily-ai-news")

    run_now(kubectl, namespace, "req-1")
    [job] = wait_for(jobs, 30, "the run-now Job")
    assert job["metadata"]["annotations"]["nocturne.dev/manual-request"] == "req-1"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
    # Status follows the Job within the same pass.
    manual = wait_for(
        lambda: schedule(kubectl, namespace)["status"].get("lastManualRun"), 30, "lastManualRun"
    )
    assert manual["requestId"] == "req-1"
    # The same request again (GitOps re-sync, a retry) starts nothing new.
    run_now(kubectl, namespace, "req-1")
    time.sleep(5)
    assert len(jobs()) == 1
    run_now(kubectl, namespace, "req-2")
    wait_for(lambda: len(jobs()) == 2, 30, "the second run-now Job")


def test_deleting_the_schedule_removes_everything(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    run_now(kubectl, namespace, "before")
    wait_for(lambda: kubectl.items("jobs", "-n", namespace), 30, "a Job")
    kubectl("delete", "-n", namespace, "asched/daily-ai-news", "--wait=true", "--timeout=30s")
    wait_for(lambda: cronjob(kubectl, namespace) is None, 60, "the CronJob to be collected")
    wait_for(lambda: not kubectl.items("jobs", "-n", namespace), 60, "Jobs to be collected")
    wait_for(
        lambda: not kubectl.items("configmaps", "-n", namespace, "-l", "nocturne.dev/schedule"),
        60,
        "the task ConfigMap",
    )


def test_hand_deleted_and_hand_edited_cronjobs_are_repaired(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    patch_spec(
        kubectl, namespace, {"schedule": "* * * * *", "suspend": True}, "cronjob/daily-ai-news"
    )
    wait_for(
        lambda: (
            (c := cronjob(kubectl, namespace))
            and c["spec"]["schedule"] == "0 9 * * *"
            and not c["spec"]["suspend"]
        ),
        30,
        "the edited CronJob to be restored",
    )
    old_uid = cronjob(kubectl, namespace)["metadata"]["uid"]  # type: ignore[index]
    kubectl("delete", "-n", namespace, "cronjob/daily-ai-news")
    wait_for(
        lambda: (c := cronjob(kubectl, namespace)) and c["metadata"]["uid"] != old_uid,
        30,
        "the deleted CronJob to be recreated",
    )
    repairs = wait_for(lambda: events(kubectl, namespace, "DriftRepaired"), 15, "Events")
    assert {e["involvedObject"]["kind"] for e in repairs} == {"AgentSchedule"}


def test_orphaned_managed_cronjob_is_removed(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl(
        "create",
        "cronjob",
        "-n",
        namespace,
        "stray",
        "--image=busybox",
        "--schedule=0 0 1 1 *",
        "--",
        "true",
    )
    kubectl(
        "label",
        "-n",
        namespace,
        "cronjob/stray",
        "app.kubernetes.io/managed-by=nocturne-operator",
        "nocturne.dev/schedule=gone",
    )
    wait_for(lambda: cronjob(kubectl, namespace, "stray") is None, 30, "the orphan to go")
    assert wait_for(lambda: events(kubectl, namespace, "OrphanRemoved"), 15, "an Event")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"schedule": "TZ=Asia/Tokyo 0 9 * * *"}, "TZ= and CRON_TZ= prefixes are not supported"),
        ({"schedule": "0 9 * *"}, "must be 5 cron fields"),
        ({"budget": {"maxPerRunUSD": "two dollars"}}, "spec.budget.maxPerRunUSD"),
        ({"timeoutSeconds": 5}, "spec.timeoutSeconds"),
        ({"retries": 50}, "spec.retries"),
        ({"agent": {"model": "gpt-4o", "provider": "openai"}}, "apiKeySecretRef is required"),
        (
            {"agent": {"model": "m", "provider": "offline", "tools": ["purchase"]}},
            "restricted operations need an explicit opt-in",
        ),
        ({"concurrencyPolicy": "Sometimes"}, "spec.concurrencyPolicy"),
        ({"timeZone": "not a zone"}, "spec.timeZone"),
        (
            {"notifications": {"events": ["Failed"]}},
            "webhookSecretRef is required when spec.notifications.events is not empty",
        ),
        ({"notifications": {"format": "teams"}}, "spec.notifications.format"),
        ({"budget": {"maxPerRunUSD": "1", "maxMonthlyUSD": "1e3"}}, "spec.budget.maxMonthlyUSD"),
    ],
)
def test_invalid_schedules_are_rejected_at_apply_time(
    crds: None, kubectl: Kubectl, namespace: str, spec: dict[str, Any], message: str
) -> None:
    """The apiserver refuses these even with the operator down; nothing is stored."""
    with pytest.raises(AssertionError, match=re.escape(message)):
        kubectl.apply(namespace, manifest(**spec))
    assert kubectl.items("agentschedules", "-n", namespace) == []


def test_invalid_schedule_is_reported_on_status_and_suspends_the_cronjob(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    kubectl.apply(namespace, manifest(schedule="0,5 9 * * *"))

    def invalid() -> dict[str, Any] | None:
        obj = schedule(kubectl, namespace)
        cond = condition(obj, "Ready")
        return obj if cond and cond["reason"] == "InvalidSpec" else None

    obj = wait_for(invalid, 30, "Ready=False InvalidSpec")
    cond = condition(obj, "Ready")
    assert cond is not None
    assert cond["message"] == (
        'spec.schedule "0,5 9 * * *": runs as often as every 5 min (in Asia/Tokyo), '
        "minimum interval is 60 min"
    )
    assert obj["status"]["phase"] == "Invalid"
    cj = cronjob(kubectl, namespace)
    assert cj is not None, "an existing CronJob is suspended, not deleted"
    assert cj["spec"]["suspend"] is True
    assert cj["spec"]["schedule"] == "0 9 * * *"
    warnings = wait_for(lambda: events(kubectl, namespace, "InvalidSpec"), 15, "a Warning")
    assert warnings[0]["type"] == "Warning"
    assert "minimum interval is 60 min" in warnings[0]["message"]

    kubectl.apply(namespace, manifest(name="never-valid", schedule="*/10 * * * *"))
    wait_for(
        lambda: (
            (c := condition(schedule(kubectl, namespace, "never-valid"), "Ready"))
            and c["status"] == "False"
        ),
        30,
        "the second schedule to be judged",
    )
    assert cronjob(kubectl, namespace, "never-valid") is None


def user_side(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What a user's command writes: the spec, its generation and the annotations."""
    meta = obj["metadata"]
    return obj["spec"], meta.get("generation"), meta.get("annotations")


def test_cli_pause_resume_and_run(
    cluster: Cluster, operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")

    def nocturne(*args: str) -> subprocess.CompletedProcess[str]:
        return nocturne_cli(cluster, *args)

    assert nocturne("pause", "daily-ai-news", "-n", namespace, "--reason", "audit").returncode == 0
    obj = wait_for(
        lambda: (o := ready(kubectl, namespace)) and o["status"]["phase"] == "Suspended" and o,
        30,
        "the CLI pause",
    )
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert suspended["message"] == "audit"
    # Pausing twice changes nothing (not even the reason).
    paused = user_side(schedule(kubectl, namespace))
    again = nocturne("pause", "daily-ai-news", "-n", namespace, "--reason", "other")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "is already paused (audit); nothing changed" in again.stdout
    assert user_side(schedule(kubectl, namespace)) == paused
    resume = nocturne("resume", "daily-ai-news", "-n", namespace, "--reason", "audit done")
    assert resume.returncode == 0, resume.stdout + resume.stderr
    wait_for(
        lambda: (o := ready(kubectl, namespace)) and o["status"]["phase"] == "Active",
        30,
        "the CLI resume",
    )
    annotations = schedule(kubectl, namespace)["metadata"].get("annotations", {})
    assert "nocturne.dev/suspend-reason" not in annotations
    assert annotations["nocturne.dev/resume-reason"] == "audit done"
    [resumed] = wait_for(lambda: events(kubectl, namespace, "Resumed"), 15, "the Resumed Event")
    assert resumed["message"] == "schedule resumed: audit done"
    # Resuming what is not paused changes nothing (no new resume request either).
    running = user_side(schedule(kubectl, namespace))
    twice = nocturne("resume", "daily-ai-news", "-n", namespace)
    assert twice.returncode == 0, twice.stdout + twice.stderr
    assert "is not paused; nothing changed" in twice.stdout
    assert user_side(schedule(kubectl, namespace)) == running
    run = nocturne("run", "daily-ai-news", "-n", namespace, "--request-id", "cli-1")
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for(lambda: kubectl.items("jobs", "-n", namespace), 30, "the CLI run's Job")
    missing = nocturne("pause", "nope", "-n", namespace, "--reason", "x")
    assert missing.returncode == 1
    assert f"AgentSchedule {namespace}/nope not found" in missing.stdout


def test_dst_sensitive_schedule_gets_a_warning_condition(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(namespace, manifest(schedule="30 2 * * *", timeZone="America/New_York"))
    obj = wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    warning = condition(obj, "ScheduleWarning")
    assert warning is not None
    assert (warning["status"], warning["reason"]) == ("True", "DSTTransitions")
    assert "02:30" in warning["message"]
    assert wait_for(lambda: events(kubectl, namespace, "DSTTransitions"), 15, "a Warning Event")


def test_run_now_executes_the_runner_and_records_the_run(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    """The whole path: AgentSchedule -> CronJob -> run-now Job -> runner pod (non-root, read-only
    root, no token) -> execution row in PostgreSQL and a summary in the termination message."""
    kubectl.apply(namespace, manifest(suspend=True))
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    run_now(kubectl, namespace, "full-1")
    job = wait_for(lambda: finished_job(kubectl, namespace), 90, "the run-now Job to finish")
    pod, summary = runner_summary(kubectl, namespace, job)
    assert summary.status == "SUCCEEDED"
    assert summary.history_written
    assert pod["spec"]["automountServiceAccountToken"] is False
    with History.connect(runner_database) as history:
        row = history.get(summary.execution_id or 0)
        assert row is not None
        assert row.status == RunOutcome.SUCCEEDED
        assert row.job_uid == job["metadata"]["uid"]
        assert row.manual_request == "full-1"
        assert row.output is not None
        assert row.output.startswith("[offline provider]")


def slow_page(_request: object) -> Any:
    """Answers long after any run's deadline."""
    time.sleep(60)
    return html_page("too late")


def test_run_past_its_deadline_ends_timed_out(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    with ScriptedServer() as site:
        site.route("/slow", slow_page)
        kubectl.apply(
            namespace,
            manifest(
                suspend=True,
                timeoutSeconds=30,
                retries=0,
                task={"query": "watch", "context": {"url": f"{site.url}/slow"}},
                agent={"model": "offline-demo", "provider": "offline", "tools": ["web_fetch"]},
            ),
        )
        wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
        run_now(kubectl, namespace, "slow")
        job = wait_for(
            lambda: next(iter(kubectl.items("jobs", "-n", namespace)), None), 30, "the run-now Job"
        )
        uid = job["metadata"]["uid"]

        def final_row() -> Any:
            with History.connect(runner_database) as history:
                rows = [r for r in history.for_job(uid) if r.status != RunOutcome.RUNNING]
            return rows[0] if rows else None

        row = wait_for(final_row, 90, "the run's final row")
    assert row.status == RunOutcome.TIMED_OUT
    assert row.completed_at is not None


def wait_for_failed_runs(kubectl: Kubectl, namespace: str, count: int) -> None:
    def counted() -> bool:
        runs: dict[str, int] = status_of(kubectl, namespace).get("runs") or {}
        return runs.get("failed") == count

    wait_for(counted, 90, f"{count} failed runs on status")


def cronjob_suspended(kubectl: Kubectl, namespace: str) -> bool:
    cj = cronjob(kubectl, namespace)
    assert cj is not None, "the CronJob is missing"
    return bool(cj["spec"]["suspend"])


def webhook_secret(kubectl: Kubectl, namespace: str, url: str) -> dict[str, Any]:
    """A Secret holding the webhook URL, and the spec.notifications naming it."""
    kubectl.create_secret(namespace, "webhook", url=url)
    return {"webhookSecretRef": {"name": "webhook", "key": "url"}}


def received(server: ScriptedServer, count: int, what: str) -> list[Any]:
    """Exactly ``count`` webhook POSTs: wait for them, then make sure no more arrive."""
    wait_for(lambda: len(server.requests_to("/hook")) >= count, 60, what)
    time.sleep(3)  # a duplicate would come right behind
    bodies = [r.json() for r in server.requests_to("/hook")]
    assert len(bodies) == count, bodies
    return bodies


def resume_without_a_fix_pauses_again(
    cluster: Cluster, kubectl: Kubectl, namespace: str, hooks: ScriptedServer
) -> None:
    """Resume an auto-paused schedule whose cause is still there: the verification run fails,
    and that one failure pauses the schedule again at once (not after three more)."""
    retried = nocturne_cli(
        cluster, "resume", "daily-ai-news", "-n", namespace, "--reason", "one more try"
    )
    assert retried.returncode == 0, retried.stdout + retried.stderr
    repaused = wait_for(
        lambda: (
            (s := status_of(kubectl, namespace)).get("autoPause") and s["runs"]["failed"] == 4 and s
        ),
        90,
        "the failed verification run to pause the schedule again",
    )
    assert repaused["phase"] == "Suspended"
    assert repaused["consecutiveFailures"] == 1
    assert "pendingVerification" not in repaused
    assert cronjob_suspended(kubectl, namespace)
    _, again = received(hooks, 2, "the second AutoPaused notice")
    assert again["text"].startswith("Auto-paused: ")


def test_consecutive_failures_auto_pause_and_resume_verifies(
    cluster: Cluster,
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    runner_database: str,
) -> None:
    """An agent that cannot finish within agent.maxSteps fails every run (the offline model
    spends its one step fetching the page the task names); the operator records the runs,
    pauses after three and notifies once; a resume without a fix runs a check whose failure
    pauses it again at once; a resume after the fix runs a check, whose success sends one
    recovery notice. (An unknown model no longer gets that far: validation refuses it.)"""
    broken = {
        "model": "offline-demo",
        "provider": "offline",
        "tools": ["web_fetch"],
        "maxSteps": 1,
    }
    with ScriptedServer() as hooks:
        hooks.route("/hook", Reply(200, json={"ok": True}), method="POST")
        notifications = {
            **webhook_secret(kubectl, namespace, f"{hooks.url}/hook"),
            "events": ["AutoPaused", "Recovered"],
            "format": "slack",
        }
        failing = manifest(
            schedule="0 0 1 1 *",
            # A closed loopback port: the fetch fails at once and nothing leaves the machine.
            task={"query": "Summarise http://127.0.0.1:9/news"},
            retries=0,
            agent=broken,
            failurePolicy={"pauseAfterConsecutiveFailures": 3},
            notifications=notifications,
        )
        kubectl.apply(namespace, failing)
        wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
        for n in (1, 2):
            run_now(kubectl, namespace, f"fail-{n}")
            wait_for_failed_runs(kubectl, namespace, n)
        first = status_of(kubectl, namespace)
        assert first["lastRun"]["result"] == "Failed"
        assert first["consecutiveFailures"] == 2
        assert "autoPause" not in first
        run_now(kubectl, namespace, "fail-3")
        paused = wait_for(
            lambda: (s := status_of(kubectl, namespace)).get("autoPause") and s, 90, "auto-pause"
        )
        assert paused["phase"] == "Suspended"
        assert paused["consecutiveFailures"] == 3
        suspended = condition(schedule(kubectl, namespace), "Suspended")
        assert suspended is not None
        assert (suspended["status"], suspended["reason"]) == ("True", "ConsecutiveFailures")
        assert cronjob_suspended(kubectl, namespace)
        assert wait_for(lambda: events(kubectl, namespace, "AutoPaused"), 15, "an Event")
        [auto_paused] = received(hooks, 1, "the AutoPaused notice")
        assert auto_paused["text"].startswith("Auto-paused: ")
        assert "3 failed runs in a row" in json.dumps(auto_paused["blocks"])
        [delivery] = hooks.requests_to("/hook")
        assert delivery.headers["x-nocturne-event"] == "AutoPaused"
        with History.connect(runner_database) as history:
            rows = history.runs(namespace, "daily-ai-news")
        assert {r.status for r in rows} == {RunOutcome.FAILED}
        assert all("agent.maxSteps=1" in (r.error or "") for r in rows), rows

        resume_without_a_fix_pauses_again(cluster, kubectl, namespace, hooks)

        # Fix the cause and resume: one verification run at once, then back to Active.
        fixed = {**failing, "spec": {**failing["spec"], "agent": manifest()["spec"]["agent"]}}
        kubectl.apply(namespace, fixed)
        resume = nocturne_cli(cluster, "resume", "daily-ai-news", "-n", namespace)
        assert resume.returncode == 0, resume.stdout + resume.stderr
        healed = wait_for(
            lambda: (
                (s := status_of(kubectl, namespace)).get("lastRun", {}).get("result") == "Succeeded"
                and s
            ),
            90,
            "the verification run to succeed",
        )
        assert healed["phase"] == "Active"
        assert healed["consecutiveFailures"] == 0
        assert healed["runs"] == {"succeeded": 1, "failed": 4}
        assert "autoPause" not in healed
        assert "pendingVerification" not in healed
        assert wait_for(lambda: events(kubectl, namespace, "VerificationRun"), 15, "an Event")
        assert not cronjob_suspended(kubectl, namespace)
        *_, recovered = received(hooks, 3, "the recovery notice")
        assert recovered["text"].startswith("Recovered: ")
        assert hooks.requests_to("/hook")[2].headers["x-nocturne-event"] == "Recovered"


def test_a_webhook_that_refuses_leaves_a_warning_event_without_the_url(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    """Delivery runs apart from every handler; its failure still shows on the schedule."""
    with ScriptedServer() as hooks:
        hooks.route("/hook", Reply(400, json={"error": "invalid_payload"}), method="POST")
        url = f"{hooks.url}/hook"
        notifications = {**webhook_secret(kubectl, namespace, url), "events": ["Succeeded"]}
        kubectl.apply(namespace, manifest(notifications=notifications))
        wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
        run_now(kubectl, namespace, "refused-1")
        [event] = wait_for(
            lambda: events(kubectl, namespace, "NotificationFailed"), 90, "NotificationFailed"
        )
    assert event["type"] == "Warning"
    assert event["involvedObject"]["name"] == "daily-ai-news"
    assert "Secret webhook" in event["message"]
    assert "HTTP 400" in event["message"]
    assert url not in event["message"]
    assert str(hooks.port) not in event["message"]


def seed_runs(database_url: str, namespace: str, schedule_uid: str, *costs: str) -> None:
    """Finished runs of daily-ai-news started now, as a runner would have recorded them."""
    with History.connect(database_url) as history:
        for i, cost in enumerate(costs):
            key = ExecutionKey(
                namespace,
                "daily-ai-news",
                schedule_uid,
                f"j{i}",
                f"job-{namespace}-{i}",
                f"pod-{namespace}-{i}",
                0,
            )
            run_id = history.start(
                key, model="gpt-4o-mini", provider="openai", started_at=datetime.now(UTC)
            )
            history.finish(
                run_id,
                status=RunOutcome.SUCCEEDED,
                completed_at=datetime.now(UTC),
                cost_usd=Decimal(cost),
                input_tokens=10,
                output_tokens=10,
            )


def budget_exhausted(kubectl: Kubectl, namespace: str) -> dict[str, Any] | None:
    obj = schedule(kubectl, namespace)
    cond = condition(obj, "BudgetExhausted")
    return obj if cond and cond["status"] == "True" else None


def test_reaching_the_total_budget_suspends_until_it_is_raised(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    with ScriptedServer() as hooks:
        hooks.route("/hook", Reply(204), method="POST")
        notifications = {
            **webhook_secret(kubectl, namespace, f"{hooks.url}/hook"),
            "events": ["BudgetExceeded"],
        }
        budget = {"maxPerRunUSD": "1.00", "maxTotalUSD": "3.00"}
        kubectl.apply(namespace, manifest(budget=budget, notifications=notifications))
        obj = wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
        seed_runs(runner_database, namespace, obj["metadata"]["uid"], "1.00", "1.00", "1.00")
        kubectl("label", "-n", namespace, "asched/daily-ai-news", "example.com/nudge=1")

        obj = wait_for(lambda: budget_exhausted(kubectl, namespace), 30, "BudgetExhausted")
        assert obj["status"]["phase"] == "BudgetExhausted"
        assert obj["status"]["totalCostUSD"] == "3.00"
        assert cronjob_suspended(kubectl, namespace)
        assert wait_for(lambda: events(kubectl, namespace, "BudgetExhausted"), 15, "an Event")
        [notice] = received(hooks, 1, "the BudgetExceeded notice")
        assert notice["kind"] == "BudgetExceeded"
        assert notice["state"] == "firing"
        assert notice["schedule"] == {
            "namespace": namespace,
            "name": "daily-ai-news",
            "uid": obj["metadata"]["uid"],
        }
        assert "reached maxTotalUSD 3.00" in notice["message"]

        raised = {"maxPerRunUSD": "1.00", "maxTotalUSD": "10.00"}
        kubectl.apply(namespace, manifest(budget=raised, notifications=notifications))
        wait_for(
            lambda: (o := ready(kubectl, namespace)) and o["status"]["phase"] == "Active",
            30,
            "the raised budget to lift the hold",
        )
        assert not cronjob_suspended(kubectl, namespace)


def test_monthly_budget_holds_until_the_next_month_in_the_schedule_zone(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    kubectl.apply(namespace, manifest(budget={"maxPerRunUSD": "1.00", "maxMonthlyUSD": "2.00"}))
    obj = wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    seed_runs(runner_database, namespace, obj["metadata"]["uid"], "1.50", "0.50")
    kubectl("label", "-n", namespace, "asched/daily-ai-news", "example.com/nudge=1")
    obj = wait_for(lambda: budget_exhausted(kubectl, namespace), 30, "BudgetExhausted")
    held = condition(obj, "BudgetExhausted")
    assert held is not None
    assert held["reason"] == "MonthlyBudgetReached"
    tokyo = datetime.now(ZoneInfo("Asia/Tokyo"))
    first = (tokyo.replace(day=28) + timedelta(days=4)).replace(day=1)
    assert f"resumes automatically at {first:%Y-%m-%d} 00:00 JST" in held["message"]
    assert obj["status"]["thisMonth"] == {"month": f"{tokyo:%Y-%m}", "costUSD": "2.00"}
    assert cronjob_suspended(kubectl, namespace)
    # A manual resume does not lift a budget hold.
    kubectl("annotate", "-n", namespace, "asched/daily-ai-news", "nocturne.dev/resume=r1")
    time.sleep(3)
    assert budget_exhausted(kubectl, namespace) is not None
    assert cronjob_suspended(kubectl, namespace)


def test_lifecycle_is_recorded_in_the_audit_trail(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, history_url: str
) -> None:
    kubectl.apply(namespace, manifest())
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    patch_spec(kubectl, namespace, {"suspend": True})
    wait_for(lambda: status_of(kubectl, namespace).get("phase") == "Suspended", 30, "pause")
    kubectl("delete", "-n", namespace, "asched/daily-ai-news", "--wait=true")

    def kinds() -> list[str] | None:
        with History.connect(history_url) as history:
            found = [e.kind for e in reversed(history.events(namespace, "daily-ai-news"))]
        return found if "deleted" in found else None

    recorded = wait_for(kinds, 30, "the deletion in the audit trail")
    assert recorded[0] == "created"
    assert "updated" in recorded
    assert "paused" in recorded
    with History.connect(history_url) as history:
        actors = {e.actor for e in history.events(namespace, "daily-ai-news")}
    # Who changed it, not the operator's own bookkeeping writes (kopf, nocturne-operator).
    assert actors
    assert all(a is not None and a.startswith("kubectl") for a in actors), actors


def test_describe_shows_status_next_runs_and_last_runs(
    cluster: Cluster,
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    runner_database: str,
) -> None:
    kubectl.apply(namespace, manifest(suspend=False))
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    run_now(kubectl, namespace, "describe-1")
    wait_for(
        lambda: status_of(kubectl, namespace).get("lastRun", {}).get("result") == "Succeeded",
        90,
        "the run on status",
    )
    described = nocturne_cli(
        cluster, "describe", "daily-ai-news", "-n", namespace, database_url=runner_database
    )
    assert described.returncode == 0, described.stderr
    out = described.stdout
    assert f"Name:          {namespace}/daily-ai-news" in out
    assert "Phase:         Active" in out
    assert "09:00 JST" in out
    assert "Ready=True Reconciled" in out
    assert "SUCCEEDED" in out.split("Last runs:")[1]
    assert "1 succeeded, 0 failed" in out

    # The same through kubectl's plugin mechanism: `kubectl nocturne` finds kubectl-nocturne on
    # the PATH (installed with the package) and hands it the kubeconfig.
    plugin = subprocess.run(
        [str(kubectl.binary), "nocturne", "history", "daily-ai-news", "-n", namespace],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "KUBECONFIG": str(cluster.kubeconfig),
            "NOCTURNE_DATABASE_URL": runner_database,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert plugin.returncode == 0, plugin.stderr
    assert "SUCCEEDED" in plugin.stdout


def test_metrics_are_served_with_their_names_types_and_values(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    with ScriptedServer() as hooks:
        hooks.route("/hook", Reply(200), method="POST")
        notifications = {
            **webhook_secret(kubectl, namespace, f"{hooks.url}/hook"),
            "events": ["Succeeded"],
        }
        kubectl.apply(namespace, manifest(notifications=notifications))
        wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
        run_now(kubectl, namespace, "metrics-1")
        wait_for(
            lambda: status_of(kubectl, namespace).get("lastRun", {}).get("result") == "Succeeded",
            90,
            "the run on status",
        )
        # The opt-in Succeeded notice carries the run's output (the digest lands in the channel).
        [digest] = received(hooks, 1, "the Succeeded notice")
    assert digest["kind"] == "Succeeded"
    assert digest["run"]["result"] == "Succeeded"
    assert digest["run"]["output"], digest
    # The exposition format sorts labels by name.
    labels = f'namespace="{namespace}",schedule="daily-ai-news"'

    def runs(result: str) -> str:
        return (
            f'nocturne_runs_total{{namespace="{namespace}",result="{result}",'
            f'schedule="daily-ai-news"}}'
        )

    def scrape() -> str | None:
        text = operator.metrics()
        return text if f"{runs('succeeded')} 1.0" in text else None

    text = wait_for(scrape, 30, "the run in the metrics")
    for name, kind in [
        ("nocturne_schedules", "gauge"),
        ("nocturne_runs_total", "counter"),
        ("nocturne_run_cost_usd_total", "counter"),
        ("nocturne_tokens_total", "counter"),
        ("nocturne_run_duration_seconds", "histogram"),
        ("nocturne_budget_exhausted_total", "counter"),
        ("nocturne_auto_pauses_total", "counter"),
        ("nocturne_reconcile_duration_seconds", "histogram"),
        ("nocturne_reconcile_errors_total", "counter"),
        ("nocturne_notifications_total", "counter"),
        ("nocturne_reconcile_queue_depth", "gauge"),
        ("nocturne_schedule_reconciled_timestamp_seconds", "gauge"),
        ("nocturne_kube_requests_total", "counter"),
    ]:
        assert f"# TYPE {name} {kind}" in text, name
    assert f"{runs('failed')} 0.0" in text  # label sets are initialised at zero
    assert f"nocturne_run_duration_seconds_count{{{labels}}} 1.0" in text
    assert f"nocturne_auto_pauses_total{{{labels}}} 0.0" in text
    assert reconciled_at(operator, namespace, "daily-ai-news") > time.time() - 600
    assert 'nocturne_notifications_total{kind="SilentStop",result="failed"} 0.0' in text
    sent = re.search(
        r'^nocturne_notifications_total\{kind="Succeeded",result="sent"\} (\d+)\.0$', text, re.M
    )
    assert sent is not None
    assert int(sent.group(1)) >= 1
    active = re.search(r'^nocturne_schedules\{phase="Active"\} (\d+)\.0$', text, re.M)
    assert active is not None
    assert int(active.group(1)) >= 1
