"""Outages on the real control plane: the operator restarting while a run finishes, and the
history database down while a run finishes. Each test runs its own operator over its own
namespace (the session operator leaves ``solo-*`` alone) with a fast sweep, its own
history, and a local OpenAI-compatible model, so the runs cost real (tiny) money."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from agent_runner.summary import parse_summary
from e2e.conftest import Model, OperatorProcess, operator_process
from e2e.schedules import finished, ready, run_now, runner_summary, status_of
from harness.controlplane import free_ports
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from integration.llm_server import OPENAI_PATH, ScriptedServer
from nocturne_operator.storage import (
    ExecutionKey,
    ExecutionRecord,
    History,
    quantize_usd,
    upgrade,
)

pytestmark = pytest.mark.e2e

NAME = "nightly-digest"
SWEEP_SECONDS = 2
# Housekeeping every SWEEP_SECONDS, and every schedule passed at least that often too.
FAST_SWEEP = {
    "NOCTURNE_RECONCILE_INTERVAL_SECONDS": str(SWEEP_SECONDS),
    "NOCTURNE_RESYNC_INTERVAL_SECONDS": str(SWEEP_SECONDS),
}
API_KEY_SECRET = "llm-api-key"  # noqa: S105 - a Secret's name, not a secret
# The fields of status.<...> derived from PostgreSQL.
RESULT_FIELDS = ("runs", "totalCostUSD", "consecutiveFailures", "lastRun")


def history_schema(postgres: PostgresServer, namespace: str) -> str:
    """A migrated history schema of the session's server, named for the test's namespace."""
    url = postgres.fresh_schema(namespace.replace("-", "_")[:60])
    upgrade(url)
    return url


def solo_operator(  # noqa: PLR0917 - the fixtures a test has, in order
    cluster: Cluster,
    namespace: str,
    database_url: str,
    role: str,
    site: ScriptedServer,
    run_api_port: int | None = None,
    *,
    settings: dict[str, str] | None = None,
) -> AbstractContextManager[OperatorProcess]:
    """An operator serving only ``namespace``; logs to ``<namespace>-<role>.log``. The admin's
    allow-lists admit the local model's endpoint and the key's Secret. ``settings``: its
    environment beyond that (default: ``FAST_SWEEP``)."""
    return operator_process(
        cluster,
        database_url=database_url,
        watch_namespaces=namespace,
        extra_env={
            **(FAST_SWEEP if settings is None else settings),
            "NOCTURNE_LLM_SECRETS": json.dumps([API_KEY_SECRET]),
            "NOCTURNE_LLM_BASE_URLS": json.dumps([f"{site.url}/v1"]),
        },
        log_name=f"{namespace}-{role}",
        run_api_port=run_api_port,
    )


def prepare_namespace(kubectl: Kubectl, namespace: str, database_url: str) -> None:
    """The Secret runner pods read: the model's API key (no database URL: runner pods report
    through the operator's run API)."""
    kubectl.create_secret(namespace, API_KEY_SECRET, key="sk-e2e-resilience")


QUERY = "Summarise the night's news"


def manifest(site: ScriptedServer, **spec: Any) -> dict[str, Any]:
    """A suspended schedule (only run-now starts runs) on the local model; ``spec`` adds to or
    replaces fields of its spec (``agent`` and ``budget`` are merged)."""
    agent = {
        "model": "gpt-4o-mini",
        "provider": "openai",
        "baseURL": f"{site.url}/v1",
        "apiKeySecretRef": {"name": API_KEY_SECRET, "key": "key"},
        **spec.pop("agent", {}),
    }
    budget = {"maxPerRunUSD": "0.50", **spec.pop("budget", {})}
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": NAME},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "UTC",
            "suspend": True,
            "task": {"query": QUERY},
            "agent": agent,
            "budget": budget,
            "timeoutSeconds": 120,
            "retries": 0,
            **spec,
        },
    }


def apply(kubectl: Kubectl, namespace: str, body: dict[str, Any]) -> str:
    """Apply the schedule, wait until it is Ready; its UID."""
    kubectl.apply(namespace, body)
    obj = wait_for(lambda: ready(kubectl, namespace, NAME), 30, f"{namespace}/{NAME} to be Ready")
    return str(obj["metadata"]["uid"])


def apply_schedule(kubectl: Kubectl, namespace: str, site: ScriptedServer) -> None:
    """A suspended schedule (only run-now starts runs) using the local model."""
    apply(kubectl, namespace, manifest(site))


def results(status: dict[str, Any]) -> dict[str, Any]:
    """The PostgreSQL-derived part of a status."""
    return {k: status.get(k) for k in RESULT_FIELDS}


def wait_for_succeeded(
    kubectl: Kubectl, namespace: str, count: int, timeout: float, what: str
) -> None:
    wait_for(
        lambda: (status_of(kubectl, namespace, NAME).get("runs") or {}).get("succeeded") == count,
        timeout,
        what,
    )


def jobs(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return kubectl.items("jobs", "-n", namespace, "-l", f"nocturne.dev/schedule={NAME}")


def job_for(kubectl: Kubectl, namespace: str, request: str) -> dict[str, Any] | None:
    """The Job of run-now ``request``, if created."""
    return next(
        (
            j
            for j in jobs(kubectl, namespace)
            if j["metadata"].get("annotations", {}).get("nocturne.dev/manual-request") == request
        ),
        None,
    )


def finished_job(kubectl: Kubectl, namespace: str, request: str) -> dict[str, Any] | None:
    """The Job of run-now ``request`` once it has ended."""
    job = job_for(kubectl, namespace, request)
    return job if finished(job) else None


def status_with(kubectl: Kubectl, namespace: str, key: str) -> dict[str, Any] | None:
    """The schedule's status once ``key`` is set on it."""
    status = status_of(kubectl, namespace, NAME)
    return status if status.get(key) else None


def attempts(database_url: str, job: dict[str, Any]) -> list[ExecutionRecord]:
    """The Job's history rows, oldest first."""
    with History.connect(database_url) as history:
        return history.for_job(job["metadata"]["uid"])


def event_kinds(database_url: str, namespace: str) -> Counter[str]:
    with History.connect(database_url) as history:
        return Counter(e.kind for e in history.events(namespace, NAME, limit=1000))


def metric(operator: OperatorProcess, sample: str) -> float:
    """The value of one sample line (name with labels) on the operator's /metrics."""
    text = operator.metrics()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not on {operator.metrics_url}:\n{text}")


def runs_total(namespace: str, result: str) -> str:
    # The exposition format sorts labels by name.
    return f'nocturne_runs_total{{namespace="{namespace}",result="{result}",schedule="{NAME}"}}'


RECONCILES = "nocturne_reconcile_duration_seconds_count"


def assert_results_match(status: dict[str, Any], rows: list[ExecutionRecord]) -> None:
    """The status's run results are what the execution rows say (one attempt per Job)."""
    succeeded = sum(r.status is RunOutcome.SUCCEEDED for r in rows)
    newest = max(rows, key=lambda r: (r.started_at, r.id))
    assert status["runs"] == {"succeeded": succeeded, "failed": len(rows) - succeeded}, status
    assert status["consecutiveFailures"] == 0, status
    assert Decimal(status["totalCostUSD"]) == sum((r.cost_usd for r in rows), Decimal(0))
    last = status["lastRun"]
    assert (last["job"], last["result"]) == (newest.job_name, "Succeeded"), last
    assert Decimal(last["costUSD"]) == newest.cost_usd
    assert (last["inputTokens"], last["outputTokens"]) == (
        newest.input_tokens,
        newest.output_tokens,
    )


@pytest.mark.usefixtures("crds", "node")
def test_operator_restart_changes_no_totals(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """A run granted its budget before the operator stops and finishing while it is down cannot
    report through the run API: its summary is the fallback, and the new operator records it
    once from there. Status equals PostgreSQL, sweeps change nothing, metrics re-count
    nothing."""
    namespace = solo_namespace
    answers, site = model
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    # A restart keeps its address: the CronJob it rendered stays as it is.
    [run_api_port] = free_ports(1)
    with solo_operator(cluster, namespace, url, "first", site, run_api_port) as first:
        apply_schedule(kubectl, namespace, site)
        for count, request in enumerate(("before-1", "before-2"), start=1):
            run_now(kubectl, namespace, request, NAME)
            wait_for_succeeded(kubectl, namespace, count, 90, f"run {request} on status")
        before = results(status_of(kubectl, namespace, NAME))
        assert Decimal(before["totalCostUSD"]) > 0, before

        answers.delay = 8
        run_now(kubectl, namespace, "during-outage", NAME)
        wait_for(
            lambda: len(site.requests_to(OPENAI_PATH)) == 3, 60, "the third run to call the model"
        )
        events_before = event_kinds(url, namespace)
        first.stop()
        assert not finished(job_for(kubectl, namespace, "during-outage")), (
            "the run ended before the operator stopped: the model answers too fast"
        )
        job = wait_for(
            lambda: finished_job(kubectl, namespace, "during-outage"),
            60,
            "the third run to finish while the operator is down",
        )
        assert finished(job) == "Complete", job["status"]
        assert results(status_of(kubectl, namespace, NAME)) == before, "nobody serves the namespace"
        _, summary = runner_summary(kubectl, namespace, job)
        assert summary.status == "SUCCEEDED"
        assert not summary.history_written, "nobody served the run API"
        assert summary.execution_id is not None, "the grant came before the operator stopped"

    with solo_operator(cluster, namespace, url, "second", site, run_api_port) as second:
        wait_for_succeeded(kubectl, namespace, 3, 30, "the new operator's totals")
        settled = status_of(kubectl, namespace, NAME)
        with History.connect(url) as history:
            rows = history.runs(namespace, NAME)
            [row] = history.for_job(job["metadata"]["uid"])
        assert len(rows) == 3, rows
        assert row.status is RunOutcome.SUCCEEDED
        assert row.cost_usd == quantize_usd(summary.cost_usd)
        assert row.metadata.get("recordedBy") == "operator", row.metadata
        assert_results_match(settled, rows)
        assert Decimal(settled["totalCostUSD"]) == Decimal(before["totalCostUSD"]) + row.cost_usd
        assert settled["lastRun"]["job"] == job["metadata"]["name"]
        added = event_kinds(url, namespace) - events_before
        assert not added, f"the restart added audit events: {added}"

        # Several sweeps later nothing has moved: status, rows, audit trail, Jobs.
        reconciles = metric(second, RECONCILES)
        wait_for(
            lambda: metric(second, RECONCILES) >= reconciles + 3,
            10 * SWEEP_SECONDS,
            "three more passes (each schedule is resynced every SWEEP_SECONDS here)",
        )
        assert status_of(kubectl, namespace, NAME) == settled
        with History.connect(url) as history:
            assert history.runs(namespace, NAME) == rows
        assert event_kinds(url, namespace) == events_before
        assert len(jobs(kubectl, namespace)) == 3, "the standing run-now request ran again"
        # Runs that finished before this process started are not counted again (nor, today,
        # the one that finished while no operator ran: handlers._record_job counts only Jobs
        # finished after the process started).
        assert metric(second, runs_total(namespace, "succeeded")) == 0.0


@pytest.mark.usefixtures("crds", "node")
def test_no_database_no_grant_no_spend_and_status_says_why(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    private_postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """PostgreSQL is down when a run starts: the operator cannot reserve its budget, so the run
    spends nothing (no model call) and says why in its summary; once PostgreSQL is back the
    operator records it from the summary and status shows the reason. The next run works."""
    namespace = solo_namespace
    _, site = model
    url = private_postgres.url
    prepare_namespace(kubectl, namespace, url)
    with solo_operator(cluster, namespace, url, "operator", site) as operator:
        apply_schedule(kubectl, namespace, site)
        private_postgres.stop()
        run_now(kubectl, namespace, "db-down", NAME)
        job = wait_for(
            lambda: finished_job(kubectl, namespace, "db-down"),
            90,
            "the run without a grant to end",
        )
        assert finished(job) == "Failed", job["status"]
        assert site.requests_to(OPENAI_PATH) == [], "a run without a grant called the model"
        job_name = job["metadata"]["name"]
        [pod] = kubectl.items(
            "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job_name}"
        )
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 1, terminated  # transient: retried within backoffLimit
        summary = parse_summary(terminated["message"])
        assert summary is not None, terminated
        assert summary.status == "FAILED"
        assert summary.cost_usd == 0
        assert not summary.history_written
        assert summary.error is not None
        assert summary.error.startswith("no budget grant: run API unavailable"), summary.error
        deferred = f"recording Job {namespace}/{job_name} deferred"
        wait_for(
            lambda: operator.log_text().count(deferred) >= 2,
            10 * SWEEP_SECONDS,
            "the operator to defer recording the run while the database is down",
        )

        private_postgres.start()
        status = wait_for(
            lambda: status_with(kubectl, namespace, "lastRun"),
            10 * SWEEP_SECONDS,
            "the run on status once PostgreSQL is back",
        )
        last = status["lastRun"]
        assert (last["job"], last["result"]) == (job_name, "Failed")
        assert Decimal(last["costUSD"]) == 0
        assert last["message"].startswith("no budget grant: run API unavailable"), last
        assert Decimal(status["totalCostUSD"]) == 0
        [row] = attempts(url, job)
        assert (row.status, row.cost_usd) == (RunOutcome.FAILED, Decimal(0))

        run_now(kubectl, namespace, "db-back", NAME)
        wait_for_succeeded(kubectl, namespace, 1, 90, "the next run, with PostgreSQL back")
        assert len(site.requests_to(OPENAI_PATH)) >= 1


@pytest.mark.usefixtures("crds", "node")
def test_the_reaper_finalises_a_run_whose_job_is_gone(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """A runner killed with its node leaves its row RUNNING; once the Job is gone too, the
    sweep's reaper finalises the row as CANCELLED, keeping the cost recorded so far."""
    namespace = solo_namespace
    _, site = model
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    started = datetime.now(UTC) - timedelta(minutes=10)
    with History.connect(url) as history:
        run_id = history.start(
            ExecutionKey(
                namespace, NAME, "uid-gone", f"{NAME}-lost", "uid-lost-job", "uid-lost-pod", 0
            ),
            model="gpt-4o-mini",
            provider="openai",
            started_at=started,
        )
        history.record_progress(run_id, cost_usd=Decimal("0.03"), input_tokens=9, output_tokens=4)
    with solo_operator(cluster, namespace, url, "reaper", site):
        apply_schedule(kubectl, namespace, site)  # the sweep walks the schedules it knows

        def reaped() -> ExecutionRecord | None:
            with History.connect(url) as history:
                [row] = history.for_job("uid-lost-job")
            return row if row.status is not RunOutcome.RUNNING else None

        row = wait_for(reaped, 30, "the reaper to finalise the orphaned row")
    assert row.status is RunOutcome.CANCELLED
    assert row.error == f"Job {NAME}-lost was deleted before the run finished"
    assert (row.cost_usd, row.input_tokens, row.output_tokens) == (Decimal("0.03"), 9, 4)
    assert row.metadata.get("recordedBy") == "reaper"
