"""Per-namespace policy (issue 15): AgentSchedulePolicies set by a cluster admin relax the
cluster's 60-minute minimum for one namespace, so the seed's first exercise -- a status check
every 5 minutes that alerts, keeps quiet during its cooldown, and sends a recovery -- runs
there, while the same schedule is refused at `kubectl apply` time in another namespace with the
deciding policy named. A namespace reaching its monthly cap holds every schedule in it (the
grants refuse, the CronJobs are suspended) until the month turns or the cap is raised."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
import yaml

from agent_runner.contract import RunOutcome
from e2e.conftest import SOLO_NAMESPACE_PREFIX, OperatorProcess, operator_process
from e2e.schedules import condition, run_now, schedule, status_of
from e2e.test_operator import cronjob, events, received, webhook_secret
from harness import controlplane
from harness.fixtures import fresh_namespace, namespace_name
from harness.kube import Cluster, Kubectl, wait_for
from integration.llm_server import Reply, ScriptedServer, html_page
from nocturne_operator.storage import ExecutionKey, History

pytestmark = pytest.mark.e2e

POLICY_CRD = "crd/agentschedulepolicies.nocturne.dev"


def status_check(name: str, page: str, hooks: str | None = None) -> dict[str, Any]:
    """The seed's first exercise: every 5 minutes, check a status page; alert when it changed
    (the offline provider fingerprints the page), with a cooldown, and a recovery notice."""
    spec: dict[str, Any] = {
        "schedule": "*/5 * * * *",
        "timeZone": "UTC",
        "task": {"query": f"Check the status page {page} and alert when it changes"},
        "agent": {"model": "offline-demo", "provider": "offline", "tools": ["web_fetch"]},
        "budget": {"maxPerRunUSD": "0.10"},
        "timeoutSeconds": 120,
        "retries": 0,
        "failurePolicy": {"pauseAfterConsecutiveFailures": 5},
    }
    if hooks is not None:
        spec["notifications"] = {
            "webhookSecretRef": {"name": "webhook", "key": "url"},
            "events": ["Alert", "Failed", "Recovered"],
            # One alert an hour at most; its all-clear always goes out.
            "cooldownMinutes": 60,
            "format": "slack",
        }
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": spec,
    }


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedulePolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(kubectl: Kubectl, body: dict[str, Any], namespace: str | None = None) -> Any:
    where = ["-n", namespace] if namespace else []
    return subprocess.run(
        [str(kubectl.binary), f"--kubeconfig={kubectl.kubeconfig}", "apply", *where, "-f", "-"],
        input=yaml.safe_dump(body),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextmanager
def policy_operator(
    cluster: Cluster, kubectl: Kubectl, request: pytest.FixtureRequest, history_url: str
) -> Iterator[tuple[str, str, str, OperatorProcess]]:
    """Two fresh namespaces labelled for this test (``fast`` and ``standard``), their
    policies' label value, and an operator serving them with its webhook and the history."""
    kubectl("wait", "--for=condition=Established", "--timeout=60s", POLICY_CRD)
    base = namespace_name(request, SOLO_NAMESPACE_PREFIX)[:40]
    [port] = controlplane.free_ports(1)
    configuration = f"{base}.validate.nocturne.dev"
    env = {
        "NOCTURNE_WEBHOOK_PORT": str(port),
        "NOCTURNE_WEBHOOK_BIND": "127.0.0.1",
        "NOCTURNE_WEBHOOK_HOST": "127.0.0.1",
        "NOCTURNE_WEBHOOK_CONFIGURATION": configuration,
        "NOCTURNE_WEBHOOK_FAILURE_POLICY": "Fail",
    }
    with ExitStack() as stack:
        fast = stack.enter_context(fresh_namespace(kubectl, f"{base}-fast"))
        standard = stack.enter_context(fresh_namespace(kubectl, f"{base}-std"))
        kubectl("label", "namespace", fast, f"nocturne-e2e={base}", "tier=fast")
        kubectl("label", "namespace", standard, f"nocturne-e2e={base}")
        stack.callback(
            kubectl,
            "delete",
            "agentschedulepolicies",
            "-l",
            f"nocturne-e2e={base}",
            "--wait=false",
            check=False,
        )
        stack.callback(
            kubectl, "delete", "validatingwebhookconfiguration", configuration, check=False
        )
        running = stack.enter_context(
            operator_process(
                cluster,
                database_url=history_url,
                watch_namespaces=f"{base}-*",
                extra_env=env,
                log_name=f"{base}-policy",
            )
        )
        wait_for(
            lambda: kubectl(
                "get", "validatingwebhookconfiguration", configuration, "-o", "name", check=False
            ),
            60,
            "kopf to register the webhook",
        )
        yield fast, standard, base, running


def labelled(body: dict[str, Any], base: str) -> dict[str, Any]:
    body["metadata"]["labels"] = {"nocturne-e2e": base}
    return body


@pytest.mark.usefixtures("crds", "node")
def test_exercise_one_runs_every_5_minutes_where_a_policy_allows_it_and_is_refused_elsewhere(
    cluster: Cluster,
    kubectl: Kubectl,
    history_url: str,
    request: pytest.FixtureRequest,
) -> None:
    with policy_operator(cluster, kubectl, request, history_url) as (fast, standard, base, _):
        default = labelled(
            policy(
                f"{base}-default",
                {
                    "namespaceSelector": {"matchLabels": {"nocturne-e2e": base}},
                    "limits": {"minIntervalMinutes": 60},
                },
            ),
            base,
        )
        relaxed = labelled(
            policy(
                f"{base}-fast",
                {
                    "namespaceSelector": {"matchLabels": {"nocturne-e2e": base, "tier": "fast"}},
                    "priority": 10,
                    "limits": {"minIntervalMinutes": 5},
                },
            ),
            base,
        )
        for body in (default, relaxed):
            done = apply(kubectl, body)
            assert done.returncode == 0, done.stderr

        # Each policy reports the namespaces it selects, and that it is valid.
        def reported(name: str, namespaces: int) -> bool:
            found = kubectl.json("aspol", name)
            valid = condition(found, "Valid")
            status = found.get("status") or {}
            return (
                status.get("namespaces") == namespaces
                and valid is not None
                and valid["status"] == "True"
            )

        wait_for(partial(reported, f"{base}-default", 2), 60, "the default policy's status")
        wait_for(partial(reported, f"{base}-fast", 1), 60, "the fast policy's status")

        with ScriptedServer() as site, ScriptedServer() as hooks:
            site.route("/status", html_page("<p>All systems operational</p>"))
            hooks.route("/hook", Reply(200, json={"ok": True}), method="POST")
            page = f"{site.url}/status"
            # Refused in the standard namespace, at apply time, naming the deciding policy.
            refused = apply(kubectl, status_check("status-check", page), standard)
            assert refused.returncode != 0
            assert (
                'spec.schedule "*/5 * * * *": runs as often as every 5 min (in UTC), minimum '
                f'interval is 60 min (AgentSchedulePolicy "{base}-default")'
            ) in refused.stderr
            # Runs in the fast namespace.
            webhook_secret(kubectl, fast, f"{hooks.url}/hook")
            accepted = apply(kubectl, status_check("status-check", page, hooks.url), fast)
            assert accepted.returncode == 0, accepted.stderr
            wait_for(
                lambda: (
                    (r := condition(schedule(kubectl, fast, "status-check"), "Ready"))
                    and r["status"] == "True"
                ),
                60,
                "Ready=True in the fast namespace",
            )
            cj = cronjob(kubectl, fast, "status-check")
            assert cj is not None
            assert cj["spec"]["schedule"] == "*/5 * * * *"

            def run(request_id: str, count: int) -> dict[str, Any]:
                run_now(kubectl, fast, request_id, name="status-check")
                return wait_for(
                    lambda: (
                        (s := status_of(kubectl, fast, "status-check")).get("runs")
                        and sum(s["runs"].values()) == count
                        and s
                    ),
                    180,  # a loaded machine: a run takes seconds, its pod's start more
                    f"run {count} on status",
                )

            assert run("first", 1)["lastRun"]["result"] == "Succeeded"  # the first look
            site.route("/status", html_page("<p>Degraded: the API is slow</p>"))
            run("changed", 2)
            [alert] = received(hooks, 1, "the alert")
            assert alert["text"].startswith("Alert: ")
            site.route("/status", html_page("<p>Major outage</p>"))
            run("changed-again", 3)
            # The second alert within the cooldown is held back: no new POST.
            assert len(received(hooks, 1, "no second alert during the cooldown")) == 1
            # Unchanged since: no alert, so the earlier one is cleared (the recovery notice;
            # a resolution is never held back by the cooldown).
            run("steady", 4)
            first, cleared = received(hooks, 2, "the all-clear")
            assert first == alert
            assert "the earlier alert is cleared" in cleared["text"]
            assert hooks.requests_to("/hook")[1].headers["x-nocturne-event"] == "Alert"
            runs = status_of(kubectl, fast, "status-check")["runs"]
            assert runs == {"succeeded": 4, "failed": 0}


def seed_spend(history_url: str, namespace: str, schedule_uid: str, cost: str) -> None:
    """A finished run of this month in ``namespace``, as the run API would have recorded it."""
    now = datetime.now(UTC)
    key = ExecutionKey(
        namespace, "seeded", schedule_uid, "seeded-1", f"job-{schedule_uid}", "pod-1", 0
    )
    with History.connect(history_url) as history:
        execution = history.start(key, model="gpt-4o-mini", provider="openai", started_at=now)
        history.finish(
            execution,
            status=RunOutcome.SUCCEEDED,
            completed_at=now,
            cost_usd=Decimal(cost),
            input_tokens=1,
            output_tokens=1,
        )


@pytest.mark.usefixtures("crds", "node")
def test_a_namespace_at_its_monthly_cap_holds_every_schedule_until_the_cap_is_raised(
    cluster: Cluster,
    kubectl: Kubectl,
    history_url: str,
    request: pytest.FixtureRequest,
) -> None:
    with policy_operator(cluster, kubectl, request, history_url) as (fast, _, base, _):
        capped = labelled(
            policy(
                f"{base}-cap",
                {
                    "namespaceSelector": {"matchLabels": {"tier": "fast", "nocturne-e2e": base}},
                    "namespaceBudget": {"maxMonthlyUSD": "1.00", "timeZone": "UTC"},
                },
            ),
            base,
        )
        assert apply(kubectl, capped).returncode == 0
        # A policy the webhook cannot accept: a zone that does not exist.
        broken = labelled(
            policy(
                f"{base}-broken",
                {
                    "namespaceSelector": {"matchLabels": {"nocturne-e2e": base}},
                    "namespaceBudget": {"maxMonthlyUSD": "1", "timeZone": "Mars/Olympus"},
                },
            ),
            base,
        )
        refused = apply(kubectl, broken)
        assert refused.returncode != 0
        assert 'spec.namespaceBudget.timeZone "Mars/Olympus"' in refused.stderr

        names = ("news", "watch")
        for name in names:
            body = status_check(name, "http://127.0.0.1:9/none")
            body["spec"]["schedule"] = "0 9 * * *"
            assert apply(kubectl, body, fast).returncode == 0

        def is_ready(name: str) -> bool:
            ready = condition(schedule(kubectl, fast, name), "Ready")
            return ready is not None and ready["status"] == "True"

        def held(name: str) -> dict[str, Any] | None:
            spent = condition(schedule(kubectl, fast, name), "BudgetExhausted")
            return spent if spent and spent["status"] == "True" else None

        def released(name: str) -> bool:
            found = cronjob(kubectl, fast, name)
            return held(name) is None and found is not None and not found["spec"]["suspend"]

        for name in names:
            wait_for(partial(is_ready, name), 60, f"{name} Ready")
        uid = schedule(kubectl, fast, "news")["metadata"]["uid"]
        seed_spend(history_url, fast, f"{uid}-earlier", "1.00")
        # The cap is spent: the next pass of either schedule holds both.
        run_now(kubectl, fast, "over-the-cap", name="news")
        for name in names:
            spent = wait_for(partial(held, name), 90, f"{name} held by the namespace budget")
            assert spent["reason"] == "NamespaceBudgetReached"
            assert f"namespace {fast} spent 1.00 USD" in spent["message"]
            assert f'(AgentSchedulePolicy "{base}-cap")' in spent["message"]
            assert "resumes automatically at" in spent["message"]
            cj = cronjob(kubectl, fast, name)
            assert cj is not None
            assert cj["spec"]["suspend"] is True
        # The run asked for was refused its grant by the namespace's budget.
        with History.connect(history_url) as history:
            refusals = wait_for(
                lambda: [
                    r for r in history.runs(fast, "news", limit=5)
                    if r.status is RunOutcome.BUDGET_EXCEEDED
                ],
                90,
                "the refused run in history",
            )  # fmt: skip
        assert "the namespace's maxMonthlyUSD 1.00 reached" in str(refusals[0].error)
        assert events(kubectl, fast, "BudgetExhausted")
        # Raising the cap releases every schedule at once.
        capped["spec"]["namespaceBudget"]["maxMonthlyUSD"] = "5.00"
        assert apply(kubectl, capped).returncode == 0
        for name in names:
            wait_for(partial(released, name), 60, f"{name} released, its CronJob resumed")
        assert (
            json.loads(kubectl("get", "aspol", f"{base}-cap", "-o", "json"))["status"]["namespaces"]
            == 1
        )
