"""The chart's dashboard and alerts as the tests read them: the rendered PrometheusRule and
dashboard, every PromQL expression in them, and the metric names those select (read by
Prometheus's own PromQL parser, ``promql-names`` in tests/harness/gotools/prometheus), compared
with the names an operator's /metrics serves."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import gotools
from harness.build import BuildError
from harness.prerequisites import skip_or_fail
from unit.test_helm_chart import CHART, one, render

DASHBOARD = CHART / "files" / "dashboards" / "nocturne.json"
# Both parts on, with the scrape job the ServiceMonitor gives the operator.
MONITORING = (
    "--set=dashboards.enabled=true",
    "--set=alerts.enabled=true",
    "--set=metrics.serviceMonitor.enabled=true",
)
# Series Prometheus makes itself for every scrape target, not served by the operator.
PROMETHEUS_SERIES = frozenset({"up"})
# What the dashboard's variables stand for when its queries are parsed (any value of the right
# kind: a duration, a label value, a number). A new variable must be added here.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "job": "nocturne-metrics",
    "namespace": "team-a",
    "monthly_cap_usd": "100",
}


@functools.cache
def go_tool(name: str) -> Path:
    """A tool of harness.gotools, built on first use (skipped locally without Go)."""
    try:
        return gotools.ensure(name)
    except BuildError as exc:
        skip_or_fail(f"{name} could not be built: {exc}")
        raise  # unreachable: skip_or_fail raises


def prometheus_rule(*args: str) -> dict[str, Any]:
    """The chart's PrometheusRule, rendered with the monitoring values and ``args``."""
    return one(render(*MONITORING, *args), "PrometheusRule")


def rules_of(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def rule_exprs(rule: dict[str, Any]) -> list[str]:
    return [str(r["expr"]) for r in rules_of(rule)]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    """The PromQL of every panel query and of every query variable (``label_values(selector,
    label)``), its Grafana variables replaced by example values."""
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else ""
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match is not None, f"variable {variable['name']}: unexpected query {query!r}"
        exprs.append(match.group(1))
    return [grafana_to_promql(e) for e in exprs]


def grafana_to_promql(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def metric_names(exprs: list[str]) -> dict[str, list[str]]:
    """Expression -> the metric names it selects. Fails on an expression Prometheus would not
    parse, or one that selects series by a regex on the name (unverifiable)."""
    result = subprocess.run(
        [str(go_tool("promql-names"))],
        input=json.dumps(exprs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    errors = [f"{p['expr']}: {p['error']}" for p in parsed if p.get("error")]
    assert not errors, "\n".join(errors)
    return {p["expr"]: p["names"] for p in parsed}


def referenced_names() -> dict[str, set[str]]:
    """Metric name -> where it is used ("alert X", "dashboard"), over the chart's alerts and
    dashboard."""
    rule = prometheus_rule()
    sources = [(f"alert {r['alert']}", str(r["expr"])) for r in rules_of(rule)]
    sources += [("dashboard", e) for e in dashboard_exprs(dashboard())]
    names = metric_names([expr for _, expr in sources])
    used: dict[str, set[str]] = {}
    for where, expr in sources:
        for name in names[expr]:
            used.setdefault(name, set()).add(where)
    return used


def served_names(exposition: str) -> set[str]:
    """The sample names of a /metrics page (a histogram's ``_bucket``, ``_sum``, ``_count``, a
    counter's ``_total``)."""
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def unserved(used: dict[str, set[str]], served: set[str]) -> dict[str, set[str]]:
    """The referenced names that neither the operator nor Prometheus provides."""
    return {name: where for name, where in used.items() if name not in served | PROMETHEUS_SERIES}
