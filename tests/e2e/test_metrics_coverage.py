"""Every metric the chart's Grafana dashboard and Prometheus alerts read is one a real operator
serves: a run goes through the operator on the local control plane, then its /metrics page is
scraped and compared, sample name by sample name (a histogram's _bucket, _sum and _count),
with what the panels' queries and the alerts' expressions select (read by Prometheus's own
PromQL parser)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from e2e.conftest import OperatorProcess
from e2e.schedules import ready, run_now, status_of
from e2e.test_operator import manifest
from harness.kube import Kubectl, wait_for
from unit.monitoring import referenced_names, served_names, unserved

pytestmark = pytest.mark.e2e


def test_every_metric_of_the_dashboard_and_alerts_is_served_after_a_run(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, runner_database: str
) -> None:
    # A monthly cap on the namespace (AgentSchedulePolicy): its series are served too.
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/agentschedulepolicies.nocturne.dev",
    )  # fmt: skip
    kubectl("label", "namespace", namespace, f"nocturne-coverage={namespace}")
    kubectl.apply(
        "default",
        {
            "apiVersion": "nocturne.dev/v1alpha1",
            "kind": "AgentSchedulePolicy",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {"matchLabels": {"nocturne-coverage": namespace}},
                "namespaceBudget": {"maxMonthlyUSD": "100"},
            },
        },
    )
    capped = f'nocturne_namespace_budget_usd{{namespace="{namespace}"}} 100.0'
    try:
        served = _served_after_a_run(operator, kubectl, namespace).names
        page = wait_for(
            lambda: text if capped in (text := operator.metrics()) else None,
            30,
            "the namespace's budget in the metrics",
        )
    finally:
        kubectl("delete", "agentschedulepolicy", namespace, "--wait=false", check=False)
    served |= served_names(page)
    used = referenced_names()
    missing = unserved(used, served)
    assert not missing, "read by the dashboard or alerts, not served: " + ", ".join(
        f"{name} ({', '.join(sorted(where))})" for name, where in sorted(missing.items())
    )


@dataclass(frozen=True)
class _Served:
    page: str
    names: set[str]


def _served_after_a_run(operator: OperatorProcess, kubectl: Kubectl, namespace: str) -> _Served:
    """The operator's metrics page once a run of a schedule in ``namespace`` is on it."""
    kubectl.apply(namespace, manifest(suspend=True))
    wait_for(lambda: ready(kubectl, namespace), 30, "Ready=True")
    run_now(kubectl, namespace, "coverage-1")
    wait_for(
        lambda: status_of(kubectl, namespace).get("lastRun", {}).get("result") == "Succeeded",
        90,
        "the run on status",
    )
    succeeded = (
        f'nocturne_runs_total{{namespace="{namespace}",result="succeeded",'
        f'schedule="daily-ai-news"}} 1.0'
    )
    page = wait_for(
        lambda: text if succeeded in (text := operator.metrics()) else None,
        30,
        "the run in the metrics",
    )
    served = served_names(page)
    # The run's own series are there: what the run panels and the silent-stop alert read.
    assert f'nocturne_run_duration_seconds_count{{namespace="{namespace}"' in page
    assert {"nocturne_run_duration_seconds_bucket", "nocturne_run_cost_usd_total"} <= served
    return _Served(page, set(served))
