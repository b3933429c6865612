"""The runner image as users run it (issue 16): built from agent_runner/Dockerfile, started by an
upstream kubelet through containerd and runc on the real node (harness.node), as uid 65532 on a
read-only root, on the pod network. It reaches nothing but the host's bridge address, where the
operator serves the run API and a local OpenAI-compatible model answers (relayed from loopback);
the run is budgeted (a grant, the model's metered and priced usage), and its result reaches
history and the AgentSchedule's status. Its output is read with
``kubectl logs``, as a user would."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from decimal import Decimal

import pytest

from agent_runner.contract import RunOutcome
from e2e.conftest import SOLO_NAMESPACE_PREFIX, Model, operator_process
from e2e.schedules import finished_job, ready, run_now, runner_summary, status_of
from e2e.test_resilience import API_KEY_SECRET, NAME, manifest
from harness.controlplane import free_ports
from harness.fixtures import fresh_namespace
from harness.kube import Cluster, Kubectl, wait_for
from harness.node import Node
from harness.postgres import PostgresServer
from integration.llm_server import ScriptedServer
from nocturne_operator.storage import History, upgrade

pytestmark = pytest.mark.e2e


@pytest.fixture
def node_namespace(kubectl: Kubectl, node: Node | None) -> Iterator[str]:
    """A namespace whose pods run on the real node, served by the test's own operator."""
    if node is None:
        pytest.skip("the real node is the local cluster's (kind runs its own)")
    name = f"{SOLO_NAMESPACE_PREFIX}node-{secrets.token_hex(3)}"
    with fresh_namespace(kubectl, name, host_network=False) as found:
        yield found


@pytest.mark.usefixtures("crds")
def test_the_runner_image_runs_a_budgeted_run_as_65532_on_a_read_only_root(
    cluster: Cluster,
    kubectl: Kubectl,
    node: Node,
    node_namespace: str,
    *,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    namespace = node_namespace
    url = postgres.fresh_schema(namespace.replace("-", "_"))
    upgrade(url)
    [port] = free_ports(1)
    _, site = model
    kubectl.create_secret(namespace, API_KEY_SECRET, key="sk-e2e-node")
    with node.relay(site.port) as model_address:
        base_url = f"http://{model_address}/v1"
        # Pods reach the host only at its bridge address: the run API listens there.
        settings = {
            "NOCTURNE_RUN_API_BIND": node.host_ip,
            "NOCTURNE_RUN_API_URL": f"https://{node.host_ip}:{port}",
            "NOCTURNE_LLM_SECRETS": json.dumps([API_KEY_SECRET]),
            "NOCTURNE_LLM_BASE_URLS": json.dumps([base_url]),
        }
        body = manifest(site)
        body["spec"]["agent"]["baseURL"] = base_url
        with operator_process(
            cluster,
            database_url=url,
            watch_namespaces=namespace,
            extra_env=settings,
            log_name=f"{namespace}-operator",
            run_api_port=port,
        ):
            kubectl.apply(namespace, body)
            wait_for(lambda: ready(kubectl, namespace, NAME), 60, "the schedule to be Ready")
            run_now(kubectl, namespace, "image-1", NAME)
            job = wait_for(lambda: finished_job(kubectl, namespace), 120, "the run's Job")
            pod, summary = runner_summary(kubectl, namespace, job)
            status = wait_for(
                lambda: (
                    (s := status_of(kubectl, namespace, NAME)).get("lastRun", {}).get("result")
                    == "Succeeded"
                    and s
                ),
                60,
                "the run's result on status",
            )

    # The real node ran the real image: bound by the scheduler, pulled from nowhere.
    assert pod["spec"]["nodeName"] == node.name
    container = pod["status"]["containerStatuses"][0]
    assert container["image"].endswith("nocturne-runner:e2e"), container
    assert container["imageID"].startswith("sha256:"), container
    assert container["containerID"].startswith("containerd://"), container
    assert pod["status"]["podIP"].startswith(node.host_ip.rsplit(".", 1)[0] + "."), pod["status"]
    # As the operator renders it, and as runc enforced it.
    security = pod["spec"]["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True, security
    assert (pod["spec"]["securityContext"].get("runAsUser") or security.get("runAsUser")) == 65532

    # Budgeted: a grant from the run API, usage metered and priced; history and status agree.
    assert (summary.status, summary.history_written) == ("SUCCEEDED", True)
    with History.connect(url) as history:
        row = history.get(summary.execution_id or 0)
    assert row is not None
    assert (row.status, row.manual_request) == (RunOutcome.SUCCEEDED, "image-1")
    assert Decimal(0) < row.cost_usd <= Decimal("0.50")
    assert status["lastRun"]["job"] == job["metadata"]["name"]
    assert Decimal(status["totalCostUSD"]) == row.cost_usd

    # The runner's log, the way users read it: through the apiserver from the kubelet.
    logs = kubectl("logs", "-n", namespace, pod["metadata"]["name"])
    assert logs.strip(), "the runner wrote nothing to its log"
    # What it wrote as uid 65532 on a read-only root: its termination summary, by the kubelet.
    terminated = container["state"]["terminated"]
    assert json.loads(terminated["message"])["status"] == "SUCCEEDED"
