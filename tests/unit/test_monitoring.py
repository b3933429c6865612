"""The chart's Grafana dashboard and PrometheusRule: off by default; the dashboard is the file
in the chart byte for byte; every alert passes promtool's checks and its unit tests (which fire
it and keep it silent), and those tests catch a changed rule; every metric a panel or an alert
reads is one the operator registers (tests/e2e/test_metrics_coverage.py checks a real
operator's /metrics too)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nocturne_operator.adapters import metrics
from nocturne_operator.runapi import metrics as runapi_metrics
from unit.monitoring import (
    DASHBOARD,
    MONITORING,
    dashboard,
    dashboard_exprs,
    go_tool,
    metric_names,
    panels,
    prometheus_rule,
    referenced_names,
    rules_of,
    unserved,
)
from unit.test_helm_chart import CHART, NAMESPACE, RELEASE, of_kind, one, render, run_helm

PROMTOOL_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.test.yaml"))
ALERTS = {
    "NocturneScheduleAutoPaused",
    "NocturneBudgetExhausted",
    "NocturneNamespaceBudgetNearlySpent",
    "NocturneScheduleSilent",
    "NocturneNotificationsFailing",
    "NocturneOperatorDown",
    "NocturneReconcileErrors",
    "NocturneOperatorStuck",
}


def test_dashboards_and_alerts_are_off_by_default() -> None:
    docs = render()
    assert of_kind(docs, "PrometheusRule") == []
    assert f"{RELEASE}-dashboards" not in {
        d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")
    }


def test_the_servicemonitor_keeps_the_schedules_namespace_label() -> None:
    monitor = one(render(*MONITORING), "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True


# The dashboard


def test_dashboard_configmap_is_the_file_byte_for_byte_with_the_sidecar_label() -> None:
    configmap = one(render(*MONITORING), "ConfigMap", f"{RELEASE}-dashboards")
    assert configmap["data"] == {"nocturne.json": DASHBOARD.read_text()}
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in configmap["metadata"]


def test_dashboard_namespace_labels_and_annotations_are_configurable() -> None:
    configmap = one(
        render(
            *MONITORING,
            "--set=dashboards.namespace=monitoring",
            "--set=dashboards.labels.team_dashboard=yes",
            "--set=dashboards.annotations.grafana_folder=Nocturne",
        ),
        "ConfigMap",
        f"{RELEASE}-dashboards",
    )
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["team_dashboard"] == "yes"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Nocturne"}


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "nocturne-overview"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "namespace"} <= variables
    titles = set()
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        titles.add(panel["title"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip(), panel["title"]
    for wanted in (
        "Schedules by phase",
        "Finished runs per hour by result",
        "Spend per namespace, last 30 days, against the monthly cap",
        "Run duration",
        "Notifications given up",
        "Operator up",
        "Reconcile errors and queue depth",
    ):
        assert wanted in titles


def test_every_dashboard_query_parses_as_promql() -> None:
    exprs = dashboard_exprs(dashboard())
    names = metric_names(exprs)  # fails on a query Prometheus's parser rejects
    assert len(names) == len(set(exprs))
    assert all(names[e] or e == "100" for e in exprs), "a query that reads no metric"


def test_a_broken_query_or_an_unknown_variable_is_reported() -> None:
    with pytest.raises(AssertionError, match="unclosed left parenthesis"):
        metric_names(["sum(rate(nocturne_runs_total[5m])"])
    with pytest.raises(AssertionError, match="no literal metric name"):
        metric_names(['{__name__=~"nocturne_.+"}'])
    board = dashboard()
    board["panels"][1]["targets"][0]["expr"] = "nocturne_runs_total{schedule=~'$schedule'}"
    with pytest.raises(AssertionError, match=r"unknown dashboard variable \$schedule"):
        dashboard_exprs(board)


# The alerts


def test_alerts_are_exactly_the_seven_with_severities_and_extra_labels() -> None:
    rule = prometheus_rule("--set=alerts.alertLabels.team=platform")
    assert rule["metadata"]["namespace"] == NAMESPACE
    rules = rules_of(rule)
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["team"] == "platform", r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        assert r["annotations"]["description"], r["alert"]
    off = prometheus_rule(
        "--set=alerts.silentStop.enabled=false", "--set=alerts.labels.release=kps"
    )
    assert {r["alert"] for r in rules_of(off)} == ALERTS - {"NocturneScheduleSilent"}
    assert off["metadata"]["labels"]["release"] == "kps"


def test_stuck_operator_threshold_is_the_resync_interval_plus_slack() -> None:
    def stuck_expr(*args: str) -> str:
        [r] = [r for r in rules_of(prometheus_rule(*args)) if r["alert"] == "NocturneOperatorStuck"]
        return str(r["expr"])

    assert stuck_expr().endswith("(nocturne_schedule_reconciled_timestamp_seconds) > 4500) > 0")
    assert stuck_expr(
        "--set=operator.resyncIntervalSeconds=600", "--set=alerts.operatorStuck.slackSeconds=300"
    ).endswith("(nocturne_schedule_reconciled_timestamp_seconds) > 900) > 0")


def test_operator_down_reads_the_scrape_job_of_the_operator() -> None:
    def down_expr(*args: str) -> str:
        [r] = [r for r in rules_of(prometheus_rule(*args)) if r["alert"] == "NocturneOperatorDown"]
        return str(r["expr"])

    assert down_expr() == f'absent(up{{job="{RELEASE}-metrics", namespace="{NAMESPACE}"}} == 1)'
    docs = render(
        "--set=alerts.enabled=true",
        "--set=metrics.serviceMonitor.enabled=false",
        "--set=alerts.operatorDown.job=kubernetes-pods",
    )
    [rule] = of_kind(docs, "PrometheusRule")
    [down] = [r for r in rules_of(rule) if r["alert"] == "NocturneOperatorDown"]
    assert 'up{job="kubernetes-pods"' in down["expr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--set=alerts.enabled=true",),
            "alerts.operatorDown needs the scrape job of the operator's metrics",
        ),
        (
            ("--set=alerts.enabled=true", "--set=metrics.enabled=false"),
            "alerts.enabled needs metrics.enabled",
        ),
        (
            ("--set=alerts.enabled=true", "--set=alerts.silentStop.window=25 hours"),
            "'/alerts/silentStop/window'",
        ),
        (("--set=alerts.reconcileErrors.threshold=-1",), "'/alerts/reconcileErrors/threshold'"),
        (("--set=alerts.alertLabels.bad-name=x",), "additional properties 'bad-name' not allowed"),
        (("--set=dashboards.namespace=Monitoring",), "'/dashboards/namespace'"),
        (("--set=alerts.operatorStuck.slack=5",), "additional properties 'slack' not allowed"),
    ],
)
def test_bad_monitoring_values_fail_with_the_fix(args: tuple[str, ...], message: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} was accepted"
    assert message in result.stderr, result.stderr


def promtool(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(go_tool("promtool")), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def write_rules(rule: dict[str, Any], directory: Path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, beside copies of the promtool
    tests (which name it rules.yaml)."""
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    for test in PROMTOOL_TESTS:
        shutil.copy(test, directory / test.name)
    return path


def test_alerts_pass_promtool_check_and_their_unit_tests(tmp_path: Path) -> None:
    rules = write_rules(prometheus_rule(), tmp_path)
    check = promtool("check", "rules", rules, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout
    result = promtool("test", "rules", *(t.name for t in PROMTOOL_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(PROMTOOL_TESTS), result.stdout


@pytest.mark.parametrize(
    ("args", "alert"),
    [
        (("--set=alerts.autoPaused.window=2h",), "NocturneScheduleAutoPaused"),
        (("--set=alerts.budgetExhausted.severity=critical",), "NocturneBudgetExhausted"),
        (("--set=alerts.namespaceBudget.threshold=0.9",), "NocturneNamespaceBudgetNearlySpent"),
        (("--set=alerts.silentStop.window=49h",), "NocturneScheduleSilent"),
        (("--set=alerts.notificationFailures.threshold=1",), "NocturneNotificationsFailing"),
        (("--set=alerts.operatorDown.for=1m",), "NocturneOperatorDown"),
        (("--set=alerts.reconcileErrors.for=5m",), "NocturneReconcileErrors"),
        (("--set=operator.resyncIntervalSeconds=900",), "NocturneOperatorStuck"),
    ],
)
def test_the_promtool_tests_catch_a_changed_rule(
    tmp_path: Path, args: tuple[str, ...], alert: str
) -> None:
    """Each alert's tests are specific enough that a different window, threshold, `for`,
    severity or resync interval fails them."""
    write_rules(prometheus_rule(*args), tmp_path)
    result = promtool("test", "rules", *(t.name for t in PROMTOOL_TESTS), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    failing = {
        line.split("alertname:", 1)[1].split(",", 1)[0].strip()
        for line in output.splitlines()
        if "alertname:" in line
    }
    assert failing == {alert}, output


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in PROMTOOL_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group["alert_rule_test"]:
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing == ALERTS, f"never tested firing: {ALERTS - firing}"
    assert silent == ALERTS, f"never tested silent: {ALERTS - silent}"


# The metrics they read


# Sample names of a family, by type (the exposition's suffixes; _created is OpenMetrics' extra).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def registered_names() -> set[str]:
    """The sample names the operator's registry can serve: every family it collects, whether or
    not a labelled series exists yet (nocturne_kube_requests_total has none before the first
    request)."""
    names = set()
    for family in metrics.REGISTRY.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def test_every_metric_a_panel_or_an_alert_reads_is_registered_by_the_operator() -> None:
    """Against the operator's own registry, run API included; the e2e test scrapes a real
    operator."""
    assert runapi_metrics.REQUESTS is not None  # imported: its families are in the registry
    registered = registered_names()
    assert "nocturne_run_api_requests_total" in registered
    used = referenced_names()
    assert not unserved(used, registered), unserved(used, registered)
    # The comparison sees what it should: histogram series, counters, Prometheus's own up.
    assert "nocturne_run_duration_seconds_bucket" in used
    assert "nocturne_runs_total" in used
    assert "up" in used
    assert unserved({"nocturne_runs": {"dashboard"}}, registered) == {
        "nocturne_runs": {"dashboard"}
    }
