"""The Helm chart on the real control plane (or kind): `helm install` runs the migration hook and
the operator pod with the chart's own ServiceAccount token, so the chart's RBAC is all the
operator has; a schedule from docs/examples runs end to end; the runner ServiceAccount can do
nothing; `helm upgrade` rolls the operator and keeps schedules; `helm uninstall` keeps the CRD and
the AgentSchedules.

Two operators must never serve the same namespace: the chart's operator watches only namespaces
named ``chart-*`` (CHART_NAMESPACE_PREFIX), which the session operator of conftest.py excludes
(NOCTURNE_WATCH_NAMESPACES=!chart-*,!solo-*).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from e2e.schedules import finished_job, patch_spec, ready, run_now, runner_summary, schedule
from harness.controlplane import free_ports
from harness.fixtures import fresh_namespace
from harness.kube import Cluster, Kubectl, wait_for
from harness.node import Node
from harness.prerequisites import skip_or_fail
from harness.tools import Tools
from nocturne_operator.storage import History

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "nocturne"
EXAMPLE = REPO / "docs" / "examples" / "daily-news.yaml"
CHART_NAMESPACE_PREFIX = "chart-"
# The images built from the project's Dockerfiles, on the real node of the local cluster
# (harness.node) as on kind, where the workflow builds and loads both under exactly these names.
OPERATOR_IMAGE, RUNNER_IMAGE, IMAGE_TAG = "nocturne-operator", "nocturne-runner", "e2e"
# Against kind, pods cannot reach the test's loopback PostgreSQL: the workflow passes an
# in-cluster URL (the chart's bundled PostgreSQL) instead.
IN_CLUSTER_DATABASE_ENV = "NOCTURNE_E2E_IN_CLUSTER_DATABASE_URL"


@dataclass(frozen=True)
class Release:
    """An installed release of the chart and what the tests need to know about it."""

    name: str
    namespace: str  # the release namespace
    watched: str  # the namespace its operator serves (AgentSchedules live here)
    database_url: str
    local_database: bool  # True when the test can query the database itself
    helm: Path
    kubeconfig: Path

    @property
    def fullname(self) -> str:
        return f"{self.name}-nocturne"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """helm against the cluster under test; AssertionError with its output on failure."""
        result = subprocess.run(
            [str(self.helm), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result


@pytest.fixture
def database_url(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A PostgreSQL URL for the release: a fresh schema of the session server, left unmigrated
    (the chart's hook migrates it), or the in-cluster URL against kind."""
    if cluster.local is None:
        url = os.environ.get(IN_CLUSTER_DATABASE_ENV, "")
        if not url:
            skip_or_fail(f"against kind, set {IN_CLUSTER_DATABASE_ENV} to a URL pods can reach")
        yield url
        return
    postgres = request.getfixturevalue("postgres")
    schema = f"chart_{secrets.token_hex(4)}"
    url = postgres.fresh_schema(schema)
    engine = sa.create_engine(postgres.url)
    try:
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def watched_namespace(kubectl: Kubectl) -> Iterator[str]:
    """The namespace the chart's operator serves (the session operator leaves chart-* alone)."""
    with fresh_namespace(kubectl, f"{CHART_NAMESPACE_PREFIX}{secrets.token_hex(4)}") as name:
        try:
            yield name
        finally:
            # The release is uninstalled by now: nobody would remove kopf's finalizer, and the
            # namespace would stay Terminating for the rest of the session.
            unfinalize = json.dumps({"metadata": {"finalizers": None}})
            for obj in kubectl("get", "asched", "-n", name, "-o", "name", check=False).split():
                kubectl("patch", obj, "-n", name, "--type=merge", "-p", unfinalize, check=False)


@pytest.fixture
def release(
    cluster: Cluster,
    cli_tools: Tools,
    kubectl: Kubectl,
    namespace: str,
    *,
    node: Node | None,  # runs the release's pods (None against kind)
    watched_namespace: str,
    database_url: str,
) -> Iterator[Release]:
    """The chart installed with --wait: the migration hook has run, the operator is Ready."""
    found = Release(
        name=f"e2e-{secrets.token_hex(3)}",
        namespace=namespace,
        watched=watched_namespace,
        database_url=database_url,
        local_database=cluster.local is not None,
        helm=cli_tools.helm,
        kubeconfig=cluster.kubeconfig,
    )
    # The operator and the migration Job read it in the release namespace; runner pods get no
    # database credential (they report through the run API).
    kubectl.create_secret(namespace, "nocturne-database", url=database_url)
    health_port, metrics_port, run_api_port = free_ports(3)
    try:
        found.run(
            "install",
            found.name,
            str(CHART),
            "--namespace",
            namespace,
            "--wait",
            "--timeout=4m",
            f"--set=operator.image.repository={OPERATOR_IMAGE}",
            f"--set=operator.image.tag={IMAGE_TAG}",
            f"--set=runner.image.repository={RUNNER_IMAGE}",
            f"--set=runner.image.tag={IMAGE_TAG}",
            f"--set=operator.watchNamespaces={{{watched_namespace}}}",
            # One operator pod, replaced by stopping it first: on the one node's host network a
            # second would want the same host ports (the scheduler refuses it). Replicas are
            # tested as processes (test_replicas.py).
            "--set=operator.replicas=1",
            "--set=operator.rollingUpdate.maxSurge=0",
            "--set=operator.rollingUpdate.maxUnavailable=1",
            # The real node runs the suite's pods on the host network (harness.node): every pod
            # needs its own ports.
            f"--set=operator.healthPort={health_port}",
            f"--set=metrics.port={metrics_port}",
            # ... and no Service DNS: runner pods reach the run API on loopback.
            f"--set=runApi.port={run_api_port}",
            f"--set=runApi.url=https://127.0.0.1:{run_api_port}",
            "--set=runApi.extraHostnames={127.0.0.1}",
            "--set=operator.reconcileIntervalSeconds=3",
            # No kube-proxy here: an APIService on the chart's ClusterIP Service would stay
            # unavailable and hold up namespace deletion for every test. The aggregated path is
            # tested with the operator as a process (test_agentruns.py).
            "--set=runsApi.enabled=false",
            # ... and a webhook URL with a Service name would send the apiserver to DNS.
            "--set=webhook.enabled=false",
        )
    except AssertionError as exc:
        # What the release's pods said, read the way users read it.
        logs = kubectl(
            "logs",
            "-n",
            namespace,
            "--all-containers",
            "--prefix",
            "--tail=40",
            "-l",
            f"app.kubernetes.io/instance={found.name}",
            check=False,
        )
        found.run("uninstall", found.name, "--namespace", namespace, "--wait", check=False)
        raise AssertionError(f"{exc}\n--- kubectl logs of the release's pods ---\n{logs}") from None
    try:
        yield found
    finally:
        found.run("uninstall", found.name, "--namespace", namespace, "--wait", check=False)


def operator_pods(kubectl: Kubectl, release: Release) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    return kubectl.items("pods", "-n", release.namespace, "-l", selector)


def running_operator(kubectl: Kubectl, release: Release) -> dict[str, Any] | None:
    """The one operator pod when it is Running and Ready and not being deleted, else None."""
    pods = [p for p in operator_pods(kubectl, release) if "deletionTimestamp" not in p["metadata"]]
    if len(pods) != 1 or pods[0].get("status", {}).get("phase") != "Running":
        return None
    conditions = {c["type"]: c["status"] for c in pods[0]["status"].get("conditions", [])}
    return pods[0] if conditions.get("Ready") == "True" else None


def can_i(kubectl: Kubectl, account: str, *request: str) -> bool:
    """``kubectl auth can-i`` as a ServiceAccount ("<namespace>:<name>")."""
    answer = kubectl(
        "auth", "can-i", f"--as=system:serviceaccount:{account}", *request, check=False
    )
    # "no" comes with exit code 1; anything but yes/no (a typo in a resource) must not pass.
    assert answer.strip() in ("yes", "no"), f"kubectl auth can-i {request}: {answer!r}"
    return answer.strip() == "yes"


def test_install_runs_a_schedule_with_the_charts_rbac(release: Release, kubectl: Kubectl) -> None:
    # The hook migrated the database before the operator started.
    if release.local_database:
        engine = sa.create_engine(release.database_url)
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        engine.dispose()
        assert {"alembic_version", "schedule_executions"} <= tables, tables
    pod = running_operator(kubectl, release)
    assert pod is not None, operator_pods(kubectl, release)
    assert pod["spec"]["serviceAccountName"] == f"{release.fullname}-operator"
    assert pod["spec"]["containers"][0]["image"] == f"{OPERATOR_IMAGE}:{IMAGE_TAG}"

    watched = release.watched
    kubectl("apply", "-n", watched, "-f", str(EXAMPLE))
    obj = wait_for(lambda: ready(kubectl, watched), 60, "the chart's operator to reconcile")
    assert obj["status"]["phase"] == "Active"
    run_now(kubectl, watched, "chart-1")
    job = wait_for(lambda: finished_job(kubectl, watched), 120, "the run-now Job to finish")
    runner, summary = runner_summary(kubectl, watched, job)
    assert runner["spec"]["serviceAccountName"] == f"{release.fullname}-runner"
    assert runner["spec"]["automountServiceAccountToken"] is False
    assert runner["spec"]["containers"][0]["image"] == f"{RUNNER_IMAGE}:{IMAGE_TAG}"
    assert summary.status == "SUCCEEDED"
    assert summary.history_written
    # The fence: no database credential reaches the tenant's namespace or its runner pods.
    env = runner["spec"]["containers"][0]["env"]
    assert not [e["name"] for e in env if "DATABASE" in e["name"]], env
    assert all(release.database_url not in str(e) for e in env)
    for secret in kubectl.items("secrets", "-n", watched):
        assert "nocturne-database" not in secret["metadata"]["name"], secret["metadata"]
        values = [
            base64.b64decode(v).decode(errors="replace") for v in secret.get("data", {}).values()
        ]
        assert not any("postgresql" in v for v in values), secret["metadata"]["name"]
    if release.local_database:
        with History.connect(release.database_url) as history:
            row = history.get(summary.execution_id or 0)
        assert row is not None
        assert row.status == RunOutcome.SUCCEEDED
        assert row.manual_request == "chart-1"

    # The operator read the result with the chart's RBAC (Jobs, pods) and filled the status.
    def recorded() -> dict[str, Any] | None:
        obj = ready(kubectl, watched)
        last = (obj or {}).get("status", {}).get("lastRun") or {}
        return obj if last.get("job") == job["metadata"]["name"] else None

    obj = wait_for(recorded, 60, "status.lastRun of the run-now Job")
    assert obj["status"]["lastRun"]["result"] == "Succeeded"
    assert obj["status"]["runs"]["succeeded"] >= 1


def test_the_runner_account_can_do_nothing_and_the_operator_only_its_job(
    release: Release, kubectl: Kubectl
) -> None:
    runner = f"{release.watched}:{release.fullname}-runner"
    assert kubectl("get", "serviceaccount", f"{release.fullname}-runner", "-n", release.watched)
    requests = [
        ("get", "pods"),
        ("list", "secrets"),
        ("get", "configmaps"),
        ("create", "pods"),
        ("create", "jobs.batch"),
        ("get", "agentschedules.nocturne.dev"),
        ("patch", "agentschedules.nocturne.dev", "--subresource=status"),
        ("create", "events"),
        ("list", "serviceaccounts"),
    ]
    for request in requests:
        assert not can_i(kubectl, runner, *request, "-n", release.watched), request
    assert not can_i(kubectl, runner, "list", "namespaces")
    assert not can_i(kubectl, runner, "list", "agentschedules.nocturne.dev", "--all-namespaces")
    bound = [
        b["metadata"]["name"]
        for b in kubectl.items("rolebindings,clusterrolebindings", "--all-namespaces")
        if any(
            s.get("kind") == "ServiceAccount" and s.get("name") == f"{release.fullname}-runner"
            for s in b.get("subjects") or []
        )
    ]
    assert bound == []

    operator = f"{release.namespace}:{release.fullname}-operator"
    ns = ("-n", release.watched)
    assert can_i(
        kubectl, operator, "patch", "agentschedules.nocturne.dev", "--subresource=status", *ns
    )
    assert can_i(kubectl, operator, "create", "cronjobs.batch", *ns)
    assert can_i(kubectl, operator, "get", "pods", *ns)
    # The run API checks runner tokens; its CA Secret lives in the release namespace only.
    assert can_i(kubectl, operator, "create", "tokenreviews.authentication.k8s.io")
    assert can_i(
        kubectl,
        operator,
        "update",
        f"secrets/{release.fullname}-run-api-tls",
        "-n",
        release.namespace,
    )
    assert not can_i(kubectl, operator, "update", "secrets", *ns)
    # Webhook URLs are read by the Secret's name; no Secret can be listed or watched.
    assert can_i(kubectl, operator, "get", "secrets", *ns)
    assert not can_i(kubectl, operator, "list", "secrets", *ns)
    assert not can_i(kubectl, operator, "watch", "secrets", *ns)
    assert not can_i(kubectl, operator, "create", "pods", *ns)
    assert not can_i(kubectl, operator, "delete", "agentschedules.nocturne.dev", *ns)
    # Only the watched namespace: not its own, not anyone else's.
    assert not can_i(kubectl, operator, "create", "cronjobs.batch", "-n", release.namespace)
    assert not can_i(kubectl, operator, "create", "cronjobs.batch", "-n", "default")


def test_upgrade_rolls_the_operator_and_keeps_schedules(release: Release, kubectl: Kubectl) -> None:
    watched = release.watched
    kubectl("apply", "-n", watched, "-f", str(EXAMPLE))
    before = wait_for(lambda: ready(kubectl, watched), 60, "Ready=True")
    old_pod = wait_for(lambda: running_operator(kubectl, release), 30, "the operator pod")

    release.run(
        "upgrade",
        release.name,
        str(CHART),
        "--namespace",
        release.namespace,
        "--reuse-values",
        "--wait",
        "--timeout=4m",
        "--set=limits.minIntervalMinutes=30",
    )
    new_pod = wait_for(lambda: running_operator(kubectl, release), 60, "the new operator pod")
    assert new_pod["metadata"]["uid"] != old_pod["metadata"]["uid"]
    settings = kubectl.json("configmap", f"{release.fullname}-settings", "-n", release.namespace)
    assert "min_interval_minutes: 30\n" in settings["data"]["settings.yaml"]

    after = schedule(kubectl, watched)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    # The new operator serves it: a spec change is observed.
    patch_spec(kubectl, watched, {"schedule": "30 7 * * 1-5"})
    changed = wait_for(lambda: ready(kubectl, watched), 60, "the new generation to be observed")
    assert changed["metadata"]["generation"] == before["metadata"]["generation"] + 1
    cronjob = kubectl.json("cronjob", "daily-ai-news", "-n", watched)
    assert cronjob["spec"]["schedule"] == "30 7 * * 1-5"


def test_uninstall_keeps_the_crd_and_the_schedules(release: Release, kubectl: Kubectl) -> None:
    watched = release.watched
    kubectl("apply", "-n", watched, "-f", str(EXAMPLE))
    before = wait_for(lambda: ready(kubectl, watched), 60, "Ready=True")

    release.run("uninstall", release.name, "--namespace", release.namespace, "--wait")

    wait_for(lambda: not operator_pods(kubectl, release), 60, "the operator pod to go")
    assert kubectl("get", "crd", "agentschedules.nocturne.dev", "-o", "name").strip()
    after = schedule(kubectl, watched)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    # Its CronJob is still owned by it (nothing deleted the owner, so GC keeps it).
    cronjob = kubectl.json("cronjob", "daily-ai-news", "-n", watched)
    assert cronjob["metadata"]["ownerReferences"][0]["uid"] == before["metadata"]["uid"]
    leftovers = kubectl(
        "get",
        "clusterroles,clusterrolebindings",
        "-o",
        "name",
        "-l",
        f"app.kubernetes.io/instance={release.name}",
    )
    assert leftovers.strip() == ""


def test_schedules_can_be_deleted_after_uninstall(release: Release, kubectl: Kubectl) -> None:
    watched = release.watched
    kubectl("apply", "-n", watched, "-f", str(EXAMPLE))
    wait_for(lambda: ready(kubectl, watched), 60, "Ready=True")
    release.run("uninstall", release.name, "--namespace", release.namespace, "--wait")
    wait_for(lambda: not operator_pods(kubectl, release), 60, "the operator pod to go")
    # Nothing may wait for the absent operator: deletion completes and garbage collection
    # removes the CronJob.
    assert not schedule(kubectl, watched)["metadata"].get("finalizers")
    kubectl("delete", "asched", "daily-ai-news", "-n", watched, "--timeout=30s")
    wait_for(
        lambda: not kubectl("get", "cronjobs", "-n", watched, "-o", "name").strip(),
        60,
        "garbage collection of the CronJob",
    )


def test_every_optional_part_passes_server_side_validation(
    cli_tools: Tools, kubectl: Kubectl, namespace: str, watched_namespace: str
) -> None:
    """The bundled PostgreSQL, NetworkPolicies, the run API, per-namespace accounts, rendered
    with everything on, are valid objects for the apiserver (dry run: nothing is created). The
    ServiceMonitor is left out: its CRD belongs to prometheus-operator."""
    rendered = subprocess.run(
        [
            str(cli_tools.helm),
            "template",
            "dry",
            str(CHART),
            "--namespace",
            namespace,
            "--set=postgresql.enabled=true",
            "--set=postgresql.auth.password=dry-run",
            f"--set=operator.watchNamespaces={{{watched_namespace}}}",
            "--set=networkPolicy.enabled=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    out = kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
    kinds = {line.split("/", 1)[0] for line in out.splitlines()}
    assert {"statefulset.apps", "networkpolicy.networking.k8s.io", "secret"} <= kinds, out
