"""The fence of issue 10 on the real control plane, with real runner pods and real PostgreSQL:
budgets reserved centrally hold for two Jobs of one schedule at once, a re-created schedule starts
clean, a retry runs the task its Job was created with, and runs that finish while the operator is
down are recorded exactly once when it is back. Each test runs its own operator over its own
namespace and history schema (the helpers of ``test_resilience``) against a local
OpenAI-compatible model whose answers the test can hold back."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from e2e.schedules import (
    finished,
    nocturne_cli,
    patch_spec,
    run_now,
    status_of,
)
from e2e.test_resilience import (
    NAME,
    QUERY,
    RECONCILES,
    apply,
    attempts,
    finished_job,
    history_schema,
    job_for,
    manifest,
    metric,
    prepare_namespace,
    solo_operator,
    status_with,
)
from harness.controlplane import free_ports
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from integration.llm_server import (
    OPENAI_PATH,
    Call,
    Recorded,
    Reply,
    ScriptedServer,
    openai_reply,
)
from nocturne_operator.render import RUN_RECORD_FINALIZER
from nocturne_operator.storage import History

pytestmark = pytest.mark.e2e

GATE_TIMEOUT = 90.0  # a held answer is given anyway after this long (a failing test's cleanup)


@dataclass
class Model:
    """The local model. Every call waits until ``gate`` is open, then answers with text. Its
    usage is what a real provider would bill for the request, or with ``whole_allowance`` every
    output token the runner allowed (``max_tokens``): a call that spends nearly its reservation."""

    gate: threading.Event = field(default_factory=threading.Event)
    whole_allowance: bool = False

    def __post_init__(self) -> None:
        self.gate.set()

    def __call__(self, request: Recorded) -> Reply:
        self.gate.wait(GATE_TIMEOUT)
        usage: Any = "auto"
        if self.whole_allowance:
            usage = {
                "prompt_tokens": math.ceil(len(request.body) / 4),
                "completion_tokens": request.json()["max_tokens"],
            }
        return openai_reply("Three stories today.", usage=usage)(request)


@pytest.fixture
def model() -> Iterator[tuple[Model, ScriptedServer]]:
    """The local OpenAI-compatible server runner pods call (answers queued with ``script``
    come first), and its knobs; the gate opens when the test ends."""
    answers = Model()
    with ScriptedServer() as site:
        site.route(OPENAI_PATH, answers, method="POST")
        try:
            yield answers, site
        finally:
            answers.gate.set()


def start_run(kubectl: Kubectl, namespace: str, request: str) -> dict[str, Any]:
    """Run-now ``request``; its Job once the operator has created it (one request id at a
    time: the annotation holds one)."""
    run_now(kubectl, namespace, request, NAME)
    return wait_for(lambda: job_for(kubectl, namespace, request), 30, f"the Job of {request}")


def run_ended(kubectl: Kubectl, namespace: str, request: str) -> dict[str, Any]:
    """The Job of run-now ``request`` once it has ended."""
    return wait_for(lambda: finished_job(kubectl, namespace, request), 60, f"run {request} to end")


def user_query(request: Recorded) -> str:
    """The task as the model got it (the user message; the task has no context)."""
    messages = request.json()["messages"]
    return str(next(m["content"] for m in messages if m["role"] == "user"))


def status_with_runs(
    kubectl: Kubectl, namespace: str, succeeded: int, failed: int = 0
) -> dict[str, Any] | None:
    """The schedule's status once it counts these runs. Read what is checked from the status
    this returns: another reconcile may overwrite it meanwhile with older results."""
    status = status_of(kubectl, namespace, NAME)
    return status if status.get("runs") == {"succeeded": succeeded, "failed": failed} else None


# maxTotalUSD leaves room for one run's whole grant (maxPerRunUSD) but not for two.
PER_RUN = Decimal("0.005")
TOTAL = Decimal("0.006")


@pytest.mark.usefixtures("crds", "node")
def test_two_jobs_at_once_never_exceed_max_total(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """Two Jobs of one schedule run at once (``concurrencyPolicy: Allow``; a run-now during a
    scheduled run reserves the same way): the first holds its whole per-run grant while its model
    call is in flight, so the second is granted only what maxTotalUSD leaves. Each run bills
    nearly all it was allowed, and the schedule's recorded spend stays within maxTotalUSD where
    two full grants would not."""
    namespace = solo_namespace
    answers, site = model
    answers.whole_allowance = True
    answers.gate.clear()
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    with solo_operator(cluster, namespace, url, "operator", site):
        budget = {"maxPerRunUSD": str(PER_RUN), "maxTotalUSD": str(TOTAL)}
        uid = apply(kubectl, namespace, manifest(site, concurrencyPolicy="Allow", budget=budget))
        first = start_run(kubectl, namespace, "first")
        wait_for(
            lambda: len(site.requests_to(OPENAI_PATH)) == 1,
            60,
            "the first run to call the model (its grant reserved)",
        )
        second = start_run(kubectl, namespace, "second")
        wait_for(
            lambda: len(site.requests_to(OPENAI_PATH)) == 2,
            60,
            "the second run to call the model while the first one's call is held",
        )
        assert not finished(job_for(kubectl, namespace, "first")), "the first run ended early"
        answers.gate.set()
        for request in ("first", "second"):
            job = run_ended(kubectl, namespace, request)
            assert finished(job) == "Complete", job["status"]
        status = wait_for(
            lambda: status_with_runs(kubectl, namespace, 2), 30, "both runs on status"
        )

    [one] = attempts(url, first)
    [two] = attempts(url, second)
    assert (one.granted_usd, two.granted_usd) == (PER_RUN, TOTAL - PER_RUN), (one, two)
    for row in (one, two):
        assert row.status is RunOutcome.SUCCEEDED, row
        assert row.schedule_uid == uid
        assert row.granted_usd is not None
        assert 0 < row.cost_usd <= row.granted_usd, row
    # The first run spent so much that a second full grant would have overspent the cap.
    assert one.cost_usd + PER_RUN > TOTAL, one
    first_call, second_call = site.requests_to(OPENAI_PATH)
    assert second_call.json()["max_tokens"] < first_call.json()["max_tokens"] / 5
    with History.connect(url) as history:
        spent = sum((r.cost_usd for r in history.runs(namespace, NAME)), Decimal(0))
    assert spent == one.cost_usd + two.cost_usd <= TOTAL
    assert Decimal(status["totalCostUSD"]) == spent, status


@pytest.mark.usefixtures("crds", "node")
def test_a_recreated_schedule_starts_clean(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """A schedule that spent money and was auto-paused after a failure is deleted and created
    again under the same name: the new object has no runs, no cost, no streak and no pause of
    its own; ``nocturne history`` still lists the old runs, each under its schedule's UID, next
    to the new object's runs, and the new totals count only the latter."""
    namespace = solo_namespace
    _, site = model
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    # One success, then a failure that also costs money: the model asks for a tool the schedule
    # does not have, and agent.maxSteps=1 leaves no call to finish with.
    site.script(
        OPENAI_PATH,
        openai_reply("Three stories today."),
        openai_reply(calls=[Call("web_search", {"query": "news"})]),
    )
    body = manifest(site, agent={"maxSteps": 1}, failurePolicy={"pauseAfterConsecutiveFailures": 1})
    with solo_operator(cluster, namespace, url, "operator", site):
        old_uid = apply(kubectl, namespace, body)
        for request, outcome in (("ok", "Complete"), ("failing", "Failed")):
            start_run(kubectl, namespace, request)
            job = run_ended(kubectl, namespace, request)
            assert finished(job) == outcome, job["status"]
        old = wait_for(
            lambda: status_with(kubectl, namespace, "autoPause"),
            30,
            "the failure to auto-pause the schedule",
        )
        assert old["runs"] == {"succeeded": 1, "failed": 1}, old
        assert old["consecutiveFailures"] == 1, old
        old_cost = Decimal(old["totalCostUSD"])
        assert old_cost > 0, old

        kubectl("delete", "asched", NAME, "-n", namespace, "--wait=true", "--timeout=60s")
        wait_for(
            lambda: not kubectl.items("cronjobs,jobs", "-n", namespace),
            60,
            "the garbage collector to delete the old CronJob and its Jobs",
        )
        new_uid = apply(kubectl, namespace, body)
        assert new_uid != old_uid
        new = wait_for(
            lambda: status_with(kubectl, namespace, "runs"),
            30,
            "the new schedule's run results on status",
        )
        assert new["runs"] == {"succeeded": 0, "failed": 0}, new
        assert Decimal(new["totalCostUSD"]) == 0, new
        assert new["consecutiveFailures"] == 0, new
        assert not new.get("autoPause"), new
        assert not new.get("lastRun"), new

        listed = history_json(cluster, namespace, url)
        assert Counter(r["scheduleUID"] for r in listed) == {old_uid: 2}, listed
        assert Decimal(0) < sum(Decimal(r["costUSD"]) for r in listed) == old_cost

        start_run(kubectl, namespace, "after")
        job = run_ended(kubectl, namespace, "after")
        assert finished(job) == "Complete", job["status"]
        after = wait_for(
            lambda: status_with_runs(kubectl, namespace, 1), 30, "the new object's run on status"
        )
    [row] = attempts(url, job)
    assert row.schedule_uid == new_uid
    assert after["consecutiveFailures"] == 0, after
    assert Decimal(after["totalCostUSD"]) == row.cost_usd > 0, after
    listed = history_json(cluster, namespace, url)
    assert Counter(r["scheduleUID"] for r in listed) == {old_uid: 2, new_uid: 1}, listed


def history_json(cluster: Cluster, namespace: str, database_url: str) -> list[dict[str, Any]]:
    """``nocturne history NAME -n NAMESPACE -o json``: every run listed under the name."""
    result = nocturne_cli(
        cluster, "history", NAME, "-n", namespace, "-o", "json", database_url=database_url
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs: list[dict[str, Any]] = json.loads(result.stdout)["runs"]
    return runs


@pytest.mark.usefixtures("crds", "node")
def test_a_retry_runs_the_task_its_job_was_created_with(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """The first attempt of a Job fails transiently (the model's connection drops three times:
    the runner charges each call's reservation, then exits 1), the query is edited before the
    Job controller retries, and the retry still asks the model the original query: the Job
    carries its own task snapshot. The retry's grant is what the first attempt left of
    maxPerRunUSD."""
    namespace = solo_namespace
    _, site = model
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    site.script(OPENAI_PATH, *[Reply(drop=True)] * 3)
    edited = "Summarise the markets instead"
    with solo_operator(cluster, namespace, url, "operator", site):
        apply(kubectl, namespace, manifest(site, retries=1))
        start_run(kubectl, namespace, "retried")
        wait_for(
            lambda: (job_for(kubectl, namespace, "retried") or {}).get("status", {}).get("failed"),
            60,
            "the Job's first pod to fail",
        )
        patch_spec(kubectl, namespace, {"task": {"query": edited}}, f"asched/{NAME}")

        def template_task() -> str | None:
            [cronjob] = kubectl.items("cronjobs", "-n", namespace)
            [runner] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
            task = next(e["value"] for e in runner["env"] if e["name"] == "NOCTURNE_TASK")
            return task if edited in task else None

        wait_for(template_task, 30, "the edited query in the CronJob's template")
        assert len(site.requests_to(OPENAI_PATH)) == 3, "the retry started before the edit"
        job = run_ended(kubectl, namespace, "retried")
        assert finished(job) == "Complete", job["status"]
        assert (job["status"]["failed"], job["status"]["succeeded"]) == (1, 1), job["status"]

    requests = site.requests_to(OPENAI_PATH)
    assert len(requests) == 4, requests
    assert [user_query(r) for r in requests] == [QUERY] * 4
    first, retry = attempts(url, job)
    assert (first.attempt, first.status) == (0, RunOutcome.FAILED), first
    assert (retry.attempt, retry.status) == (1, RunOutcome.SUCCEEDED), retry
    assert first.cost_usd > 0, "the dropped calls may have been billed: their reservations count"
    assert retry.granted_usd == Decimal("0.50") - first.cost_usd, (first, retry)


RUNS = 10


@pytest.mark.usefixtures("crds", "node")
@pytest.mark.parametrize(
    "history_limit",
    [
        # The CronJob controller prunes finished Jobs past successfulJobsHistoryLimit (3)
        # while no operator runs: their pods stay under the operator's finalizer.
        pytest.param(None, id="default-history-limit"),
        pytest.param(RUNS, id="history-limit-10"),
    ],
)
def test_runs_finishing_while_the_operator_is_down_are_recorded_once(  # noqa: PLR0917 - fixtures
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
    monkeypatch: pytest.MonkeyPatch,
    history_limit: int | None,
) -> None:
    """Ten runs hold their grants and wait for the model when the operator stops; they finish
    while it is down (their final reports cannot reach the run API: the termination summary is
    the fallback). The operator started again on the same run API address records every run
    exactly once, from its summary, and later sweeps add nothing."""
    if history_limit is not None:
        # operator_process passes its own environment on.
        monkeypatch.setenv("NOCTURNE_SUCCESSFUL_JOBS_HISTORY_LIMIT", str(history_limit))
    namespace = solo_namespace
    answers, site = model
    answers.gate.clear()
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    [run_api_port] = free_ports(1)
    with solo_operator(cluster, namespace, url, "first", site, run_api_port) as first:
        apply(kubectl, namespace, manifest(site))
        created = {
            start_run(kubectl, namespace, f"run-{i}")["metadata"]["uid"] for i in range(RUNS)
        }
        wait_for(
            lambda: len(site.requests_to(OPENAI_PATH)) == RUNS,
            90,
            "every run to hold its grant and call the model",
        )
        first.stop()
    answers.gate.set()

    def runner_pods() -> list[dict[str, Any]]:
        return [
            p
            for p in kubectl.items("pods", "-n", namespace)
            if p["metadata"].get("labels", {}).get("batch.kubernetes.io/controller-uid") in created
        ]

    def ended() -> list[dict[str, Any]] | None:
        pods = runner_pods()
        done = [p for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")]
        return pods if len(done) == RUNS else None

    # Every run's pod is still there, whether or not the CronJob pruned its Job.
    pods = wait_for(ended, 60, "the runs to finish while no operator runs")
    assert all(p["status"]["phase"] == "Succeeded" for p in pods), [p["status"] for p in pods]
    assert all(RUN_RECORD_FINALIZER in p["metadata"]["finalizers"] for p in pods)
    assert status_with_runs(kubectl, namespace, 0), "nobody served the namespace"

    with solo_operator(cluster, namespace, url, "second", site, run_api_port) as second:
        recorded = wait_for(
            lambda: status_with_runs(kubectl, namespace, RUNS),
            30,
            "the new operator to record the ten runs",
        )
        with History.connect(url) as history:
            rows = history.runs(namespace, NAME)
        assert Counter(r.job_uid for r in rows) == dict.fromkeys(created, 1), rows
        assert all(r.status is RunOutcome.SUCCEEDED for r in rows), rows
        assert all(r.metadata.get("recordedBy") == "operator" for r in rows), rows
        spent = sum((r.cost_usd for r in rows), Decimal(0))
        assert Decimal(recorded["totalCostUSD"]) == spent > 0, recorded

        # Later sweeps record nothing again (the status they write says so too).
        reconciles = metric(second, RECONCILES)
        wait_for(lambda: metric(second, RECONCILES) >= reconciles + 3, 20, "three more sweeps")
        with History.connect(url) as history:
            assert history.runs(namespace, NAME) == rows
        settled = status_of(kubectl, namespace, NAME)
        assert settled["runs"] == recorded["runs"], settled
        assert settled["totalCostUSD"] == recorded["totalCostUSD"], settled
        # Recorded pods are let go: those of pruned Jobs are deleted, the rest kept as usual.
        wait_for(
            lambda: (
                not [
                    p
                    for p in runner_pods()
                    if RUN_RECORD_FINALIZER in p["metadata"].get("finalizers", [])
                ]
            ),
            30,
            "the operator to take its finalizer off the recorded pods",
        )
