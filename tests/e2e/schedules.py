"""AgentSchedule helpers shared by the operator, resilience and chart tests: a schedule's status
and conditions, asking for a run, the run's Job and its runner's summary, the ``nocturne`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent_runner.summary import Summary, parse_summary
from harness.kube import Cluster, Kubectl

NAME = "daily-ai-news"  # the schedule of docs/examples/daily-news.yaml and most tests


def schedule(kubectl: Kubectl, namespace: str, name: str = NAME) -> dict[str, Any]:
    obj: dict[str, Any] = kubectl.json("agentschedule", name, "-n", namespace)
    return obj


def status_of(kubectl: Kubectl, namespace: str, name: str = NAME) -> dict[str, Any]:
    status: dict[str, Any] = schedule(kubectl, namespace, name).get("status", {})
    return status


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None
    )


def ready(kubectl: Kubectl, namespace: str, name: str = NAME) -> dict[str, Any] | None:
    """The schedule once Ready=True for its current generation, else None."""
    obj = schedule(kubectl, namespace, name)
    cond = condition(obj, "Ready")
    current = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
    return obj if cond and cond["status"] == "True" and current else None


def patch_spec(
    kubectl: Kubectl, namespace: str, spec: dict[str, Any], target: str = f"asched/{NAME}"
) -> None:
    """Merge-patch ``spec`` into ``target`` (an AgentSchedule unless told otherwise)."""
    patch = json.dumps({"spec": spec})
    kubectl("patch", "-n", namespace, target, "--type=merge", "-p", patch)


def run_now(kubectl: Kubectl, namespace: str, request: str, name: str = NAME) -> None:
    """Ask for a run with request id ``request`` (the annotation is overwritten)."""
    annotation = f"nocturne.dev/run-now={request}"
    kubectl("annotate", "--overwrite", "-n", namespace, f"asched/{name}", annotation)


def finished(job: dict[str, Any] | None) -> str | None:
    """``Complete`` or ``Failed`` once the Job has ended."""
    for cond in (job or {}).get("status", {}).get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return str(cond["type"])
    return None


def finished_job(kubectl: Kubectl, namespace: str) -> dict[str, Any] | None:
    """The first Job in ``namespace`` that has ended."""
    return next((j for j in kubectl.items("jobs", "-n", namespace) if finished(j)), None)


def runner_summary(
    kubectl: Kubectl, namespace: str, job: dict[str, Any]
) -> tuple[dict[str, Any], Summary]:
    """The Job's (single) runner pod, which must have exited 0, and its termination summary."""
    [pod] = kubectl.items(
        "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job['metadata']['name']}"
    )
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, terminated
    summary = parse_summary(terminated["message"])
    assert summary is not None, terminated
    return pod, summary


def nocturne_cli(
    cluster: Cluster, *args: str, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `nocturne` CLI against the cluster under test (and a history database)."""
    return run_cli(cluster.kubeconfig, *args, database_url=database_url)


def run_cli(
    kubeconfig: Path, *args: str, database_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `nocturne` CLI with ``kubeconfig`` (and a history database), as a process."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", "KUBECONFIG": str(kubeconfig)}
    if database_url is not None:
        env["NOCTURNE_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "nocturne_operator.cli.main", *args],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
