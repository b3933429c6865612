"""Run history through the Kubernetes API (issue 17), on the real path: kubectl -> kube-apiserver
(authentication, the aggregation layer) -> the operator's agentruns API (front-proxy client
certificate, SubjectAccessReview) -> PostgreSQL.

The APIService points at an ExternalName Service (``localhost``): the apiserver resolves it as it
would any Service and verifies the operator's certificate for ``<service>.<namespace>.svc``,
while the operator runs as a host process here. Tenants are ServiceAccounts with tokens from
TokenRequest and the built-in ``view`` ClusterRole, into which the chart's own
``<release>-agentruns-view`` ClusterRole aggregates."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from e2e.conftest import OperatorProcess, operator_process
from e2e.schedules import run_cli, run_now
from e2e.test_resilience import API_KEY_SECRET, NAME, apply, history_schema, manifest
from harness import controlplane, tools
from harness.fixtures import fresh_namespace
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from integration.llm_server import OPENAI_PATH, ScriptedServer, openai_reply
from nocturne_operator.storage import History

pytestmark = pytest.mark.e2e

APISERVICE = "v1alpha1.runs.nocturne.dev"
SERVICE = "nocturne-runs"
SEEDED = 10_000
CHART = Path(__file__).resolve().parents[2] / "helm" / "nocturne"


@dataclass(frozen=True)
class RunsApi:
    operator: OperatorProcess
    url: str
    team_a: str
    team_b: str
    reader: Path  # a kubeconfig: ServiceAccount "reader" of team-a, with `view` in team-a
    site: ScriptedServer


def kubeconfig_for(cluster: Cluster, kubectl: Kubectl, namespace: str, account: str) -> Path:
    """A kubeconfig holding only a ServiceAccount's token (no client certificate)."""
    assert cluster.local is not None
    token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").strip()
    path = cluster.state_dir / f"kubeconfig-{namespace}-{account}"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": cluster.server,
                            "certificate-authority": str(cluster.local.pki.ca_cert),
                        },
                    }
                ],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "reader",
                        "context": {"cluster": "local", "user": account, "namespace": namespace},
                    }
                ],
                "current-context": "reader",
            }
        )
    )
    path.chmod(0o600)
    return path


def as_user(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tools.ensure().kubectl), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def chart_reader_role(namespace: str) -> dict[str, Any]:
    """The chart's own agentruns ClusterRole, as helm renders it."""
    rendered = subprocess.run(
        [str(tools.ensure().helm), "template", "nocturne", str(CHART), "-n", namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [role] = [
        d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("agentruns-view")
    ]
    return dict(role)


def seed(url: str, namespace: str, count: int, schedule: str = "seeded") -> None:
    """``count`` finished runs of ``schedule``, one a minute back from now; every tenth failed."""
    statement = sa.text(
        """
        INSERT INTO schedule_executions (namespace, schedule_name, schedule_uid, job_name, job_uid,
            pod_uid, attempt, status, started_at, completed_at, cost_usd, model, provider)
        SELECT :ns, :schedule, 'uid-seeded', 'seeded-' || n, 'job-' || :ns || '-' || n,
            'pod-' || :ns || '-' || n, 0,
            CASE WHEN n % 10 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
            now() - n * interval '1 minute', now() - n * interval '1 minute' + interval '30 s',
            0.001, 'gpt-4o-mini', 'openai'
        FROM generate_series(1, :count) AS n
        """
    )
    with History.connect(url) as history, history.engine.begin() as conn:
        conn.execute(statement, {"ns": namespace, "schedule": schedule, "count": count})


@pytest.fixture(scope="module")
def runs_api(
    cluster: Cluster, kubectl: Kubectl, postgres: PostgresServer, crds: None
) -> Iterator[RunsApi]:
    if cluster.local is None:
        pytest.skip("the aggregated API needs the local control plane (the operator is a process)")
    del crds
    with (
        fresh_namespace(kubectl, "agentruns-svc") as service_ns,
        fresh_namespace(kubectl, "agentruns-team-a") as team_a,
        fresh_namespace(kubectl, "agentruns-team-b") as team_b,
        ScriptedServer() as site,
    ):
        url = history_schema(postgres, "agentruns")
        for team in (team_a, team_b):
            kubectl.create_secret(team, API_KEY_SECRET, key="sk-e2e-agentruns")
        seed(url, team_a, SEEDED)
        seed(url, team_b, 3, schedule="secret-plans")
        [port] = controlplane.free_ports(1)
        kubectl.apply(
            service_ns,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": SERVICE},
                "spec": {"type": "ExternalName", "externalName": "localhost"},
            },
        )
        kubectl("apply", "-f", "-", stdin=json.dumps(chart_reader_role(service_ns)))
        kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps(
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": APISERVICE},
                    "spec": {
                        "group": "runs.nocturne.dev",
                        "version": "v1alpha1",
                        "service": {"namespace": service_ns, "name": SERVICE, "port": port},
                        "groupPriorityMinimum": 1000,
                        "versionPriority": 15,
                    },
                }
            ),
        )
        kubectl("create", "serviceaccount", "reader", "-n", team_a)
        kubectl(
            "create", "rolebinding", "reader-view", "-n", team_a,
            "--clusterrole=view", f"--serviceaccount={team_a}:reader",
        )  # fmt: skip
        env = {
            "NOCTURNE_RUNS_API_PORT": str(port),
            "NOCTURNE_RUNS_API_BIND": "127.0.0.1",
            "NOCTURNE_RUNS_API_APISERVICE": APISERVICE,
            "NOCTURNE_RUN_API_HOSTNAMES": json.dumps([f"{SERVICE}.{service_ns}.svc"]),
            "NOCTURNE_LLM_SECRETS": json.dumps([API_KEY_SECRET]),
            "NOCTURNE_LLM_BASE_URLS": json.dumps([f"{site.url}/v1"]),
        }
        try:
            with operator_process(
                cluster,
                database_url=url,
                watch_namespaces=f"{team_a},{team_b}",
                extra_env=env,
                log_name="agentruns-operator",
                reports=[],
            ) as operator:
                wait_for(lambda: available(kubectl), 60, f"APIService {APISERVICE} Available")
                reader = kubeconfig_for(cluster, kubectl, team_a, "reader")
                yield RunsApi(operator, url, team_a, team_b, reader, site)
        finally:
            kubectl("delete", "apiservice", APISERVICE, "--wait=false", check=False)
            kubectl("delete", "clusterrole", "nocturne-agentruns-view", check=False)


def available(kubectl: Kubectl) -> bool:
    service = kubectl.json("apiservice", APISERVICE)
    conditions = service.get("status", {}).get("conditions", [])
    return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)


def test_a_tenant_lists_its_runs_with_kubectl_and_is_refused_anothers(runs_api: RunsApi) -> None:
    table = as_user(runs_api.reader, "get", "agentruns", "-n", runs_api.team_a, "--chunk-size=50")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "SCHEDULE", "JOB", "ATTEMPT", "RESULT", "COST", "USD", "DURATION", "AGE",
    ]  # fmt: skip
    assert len(lines) == SEEDED + 1  # kubectl followed every continue token
    assert "seeded-1 " in lines[1]  # newest first
    refused = as_user(runs_api.reader, "get", "agentruns", "-n", runs_api.team_b)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    assert 'cannot list resource "agentruns"' in refused.stderr
    assert "secret-plans" not in refused.stdout + refused.stderr
    everywhere = as_user(runs_api.reader, "get", "agentruns", "-A")
    assert everywhere.returncode != 0
    assert "forbidden" in everywhere.stderr.lower()


def raw(kubeconfig: Path, path: str) -> dict[str, Any]:
    result = as_user(kubeconfig, "get", "--raw", path)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_selectors_and_pages_over_ten_thousand_runs(runs_api: RunsApi) -> None:
    base = f"/apis/runs.nocturne.dev/v1alpha1/namespaces/{runs_api.team_a}/agentruns"
    first = raw(runs_api.reader, f"{base}?limit=50")
    assert first["kind"] == "AgentRunList"
    assert len(first["items"]) == 50
    token = first["metadata"]["continue"]
    second = raw(runs_api.reader, f"{base}?limit=50&continue={token}")
    names = [i["metadata"]["name"] for i in first["items"] + second["items"]]
    assert len(set(names)) == 100  # no overlap between pages
    starts = [i["status"]["startedAt"] for i in first["items"] + second["items"]]
    assert starts == sorted(starts, reverse=True)
    failed = as_user(
        runs_api.reader, "get", "agentruns", "-n", runs_api.team_a,
        "-l", "nocturne.dev/result=Failed", "-o", "name",
    )  # fmt: skip
    assert failed.returncode == 0, failed.stderr
    assert len(failed.stdout.split()) == SEEDED // 10
    since = (datetime.now(UTC) - timedelta(minutes=60, seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    recent = as_user(
        runs_api.reader, "get", "agentruns", "-n", runs_api.team_a,
        "--field-selector", f"status.startedAfter={since},status.result!=Failed", "-o", "name",
    )  # fmt: skip
    assert recent.returncode == 0, recent.stderr
    assert len(recent.stdout.split()) == 54  # the last hour's 60 runs, but the 6 failed
    bad = as_user(
        runs_api.reader, "get", "agentruns", "-n", runs_api.team_a,
        "--field-selector", "status.cost=1",
    )  # fmt: skip
    assert bad.returncode != 0
    assert 'field label not supported: "status.cost"' in bad.stderr


@pytest.mark.usefixtures("node")
def test_a_run_now_appears_and_finishes_in_a_watch_and_get_shows_its_output(
    runs_api: RunsApi, kubectl: Kubectl, cluster: Cluster
) -> None:
    site, team_a = runs_api.site, runs_api.team_a
    site.script(OPENAI_PATH, openai_reply("Three stories today."))
    apply(kubectl, team_a, manifest(site))
    watched = cluster.state_dir / f"agentruns-watch-{team_a}.json"
    with watched.open("w") as sink:
        watch = subprocess.Popen(
            [str(tools.ensure().kubectl), "--kubeconfig", str(runs_api.reader), "get",
             "agentruns", "-n", team_a, "-l", f"nocturne.dev/schedule={NAME}", "--watch-only",
             "--output-watch-events", "-o", "json"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    try:
        run_now(kubectl, team_a, "watched", NAME)
        wait_for(lambda: '"Succeeded"' in watched.read_text(), 90, "the watch to see the end")
    finally:
        watch.terminate()
        watch.wait(timeout=10)
    out = watched.read_text()
    events = [json.loads(doc) for doc in _documents(out)]
    results = [(e["type"], e["object"]["status"]["result"]) for e in events]
    assert ("ADDED", "Running") in results, results
    assert results[-1][1] == "Succeeded", results
    name = events[-1]["object"]["metadata"]["name"]
    one = as_user(runs_api.reader, "get", "agentrun", name, "-n", team_a, "-o", "json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["status"]["output"] == "Three stories today."
    # `nocturne history` and `show` with only a kubeconfig: no database URL anywhere.
    history = run_cli(runs_api.reader, "history", NAME, "-n", team_a)
    assert history.returncode == 0, history.stdout + history.stderr
    assert "SUCCEEDED" in history.stdout
    shown = run_cli(runs_api.reader, "show", NAME, "-n", team_a)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.strip() == "Three stories today."
    refused = run_cli(runs_api.reader, "history", "secret-plans", "-n", runs_api.team_b)
    assert refused.returncode != 0
    assert "forbidden" in (refused.stdout + refused.stderr).lower()


def _documents(stream: str) -> list[str]:
    """The JSON documents kubectl printed one after another (pretty-printed, not one a line)."""
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while index < len(stream):
        while index < len(stream) and stream[index].isspace():
            index += 1
        if index >= len(stream):
            break
        obj, end = decoder.raw_decode(stream, index)
        docs.append(json.dumps(obj))
        index = end
    return docs
