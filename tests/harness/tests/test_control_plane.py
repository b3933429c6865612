"""Acceptance of the test cluster itself: the real CronJob, Job, garbage-collector and Deployment
controllers drive pods that the real node (or kind's kubelet) runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness import controlplane
from harness.kube import Kubectl, cluster_cli, wait_for
from harness.node import Node

pytestmark = pytest.mark.e2e


def job_condition(kubectl: Kubectl, namespace: str, name: str) -> tuple[str, str] | None:
    """(type, reason) of the Job's terminal condition, or None while it runs."""
    job = kubectl.json("job", name, "-n", namespace)
    for cond in job.get("status", {}).get("conditions", []):
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"], cond.get("reason", "")
    return None


def job_pods(kubectl: Kubectl, namespace: str, job: str) -> list[dict[str, Any]]:
    return kubectl.items("pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    """The (only) container's terminated state."""
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def pod_log(kubectl: Kubectl, namespace: str, pod: str, container: str) -> str:
    """A container's log, through the apiserver from the kubelet."""
    return kubectl("logs", "-n", namespace, pod, "-c", container, check=False)


def job_manifest(name: str, script: str, **spec: object) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            **spec,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox:1.37",
                            "command": ["sh", "-c", script],
                            # Pods share the host's network (and so its hostname): the downward
                            # API names the pod.
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                }
                            ],
                        }
                    ],
                }
            },
        },
    }


def test_server_reports_a_real_version(kubectl: Kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json"))["serverVersion"]
    assert version["gitVersion"].startswith("v1.")
    assert "v0.0.0" not in version["gitVersion"]
    assert int(version["minor"]) >= 30


@pytest.mark.slow
def test_cronjob_in_tokyo_time_is_fired_by_the_cronjob_controller(
    kubectl: Kubectl, namespace: str, node: Node | None
) -> None:
    kubectl.apply(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "tick"},
            "spec": {
                "schedule": "* * * * *",
                "timeZone": "Asia/Tokyo",
                "jobTemplate": {"spec": job_manifest("unused", "echo tick from $POD_NAME")["spec"]},
            },
        },
    )
    jobs = wait_for(lambda: kubectl.items("jobs", "-n", namespace), 75, "the CronJob's first Job")
    name = jobs[0]["metadata"]["name"]
    assert jobs[0]["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
    assert wait_for(
        lambda: job_condition(kubectl, namespace, name), 30, f"Job {name} to finish"
    ) == (
        "Complete",
        "CompletionsReached",
    )
    pod = job_pods(kubectl, namespace, name)[0]["metadata"]["name"]
    assert f"tick from {pod}" in pod_log(kubectl, namespace, pod, "main")
    assert kubectl.json("cronjob", "tick", "-n", namespace)["status"]["lastScheduleTime"]


def test_create_job_from_cronjob_runs_at_once(
    kubectl: Kubectl, namespace: str, node: Node | None
) -> None:
    kubectl.apply(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "yearly"},
            "spec": {
                "schedule": "0 0 1 1 *",
                "timeZone": "Europe/Berlin",
                "jobTemplate": {"spec": job_manifest("unused", "echo manual run")["spec"]},
            },
        },
    )
    kubectl("create", "job", "-n", namespace, "--from=cronjob/yearly", "yearly-now")
    assert wait_for(lambda: job_condition(kubectl, namespace, "yearly-now"), 30, "manual Job") == (
        "Complete",
        "CompletionsReached",
    )


def test_failing_pod_is_retried_up_to_backoff_limit(
    kubectl: Kubectl, namespace: str, node: Node | None
) -> None:
    kubectl.apply(namespace, job_manifest("flaky", "echo failing; exit 1", backoffLimit=1))
    # The Job controller waits its real 10 s pod-failure backoff before the retry.
    result = wait_for(lambda: job_condition(kubectl, namespace, "flaky"), 60, "Job flaky to fail")
    assert result == ("Failed", "BackoffLimitExceeded")
    pods = job_pods(kubectl, namespace, "flaky")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert terminated(pod)["exitCode"] == 1


def test_pod_failure_policy_fails_the_job_at_once(
    kubectl: Kubectl, namespace: str, node: Node | None
) -> None:
    manifest = job_manifest(
        "bad-config",
        'echo \'{"status": "config-error"}\' > /dev/termination-log; exit 3',
        backoffLimit=4,
        podFailurePolicy={
            "rules": [
                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3, 4]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
    )
    kubectl.apply(namespace, manifest)
    result = wait_for(lambda: job_condition(kubectl, namespace, "bad-config"), 30, "Job to fail")
    assert result == ("Failed", "PodFailurePolicy")
    pods = job_pods(kubectl, namespace, "bad-config")
    assert len(pods) == 1, "FailJob must not retry"
    assert terminated(pods[0])["exitCode"] == 3
    assert json.loads(terminated(pods[0])["message"]) == {"status": "config-error"}


def test_job_deadline_kills_the_pod(kubectl: Kubectl, namespace: str, node: Node | None) -> None:
    manifest = job_manifest(
        "slow", "echo started; sleep 120; echo never", backoffLimit=0, activeDeadlineSeconds=5
    )
    kubectl.apply(namespace, manifest)
    result = wait_for(lambda: job_condition(kubectl, namespace, "slow"), 60, "Job slow to fail")
    assert result == ("Failed", "DeadlineExceeded")
    # The process really stopped: its log ends before "never".
    pods = [p["metadata"]["name"] for p in job_pods(kubectl, namespace, "slow")]
    for pod in pods:
        log = pod_log(kubectl, namespace, pod, "main")
        assert "started" in log
        assert "never" not in log


def test_deleting_a_cronjob_collects_its_jobs_and_pods(
    kubectl: Kubectl, namespace: str, node: Node | None
) -> None:
    kubectl.apply(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "doomed"},
            "spec": {
                "schedule": "0 0 1 1 *",
                "jobTemplate": {"spec": job_manifest("unused", "sleep 300")["spec"]},
            },
        },
    )
    kubectl("create", "job", "-n", namespace, "--from=cronjob/doomed", "doomed-now")
    wait_for(lambda: job_pods(kubectl, namespace, "doomed-now"), 30, "the Job's pod")
    kubectl("delete", "cronjob", "-n", namespace, "doomed", "--wait=false")
    wait_for(lambda: not kubectl.items("jobs", "-n", namespace), 60, "Jobs to be collected")
    wait_for(lambda: not kubectl.items("pods", "-n", namespace), 60, "pods to be collected")


def test_deployment_pod_gets_a_real_service_account_token_and_rbac_applies(
    kubectl: Kubectl,
    namespace: str,
    node: Node | None,
) -> None:
    kubectl("create", "serviceaccount", "-n", namespace, "reader")
    kubectl("create", "configmap", "-n", namespace, "probe", "--from-literal=msg=hello-rbac")
    kubectl.create_secret(namespace, "hidden", k="v")
    kubectl(
        "create", "role", "-n", namespace, "cm-reader", "--verb=get,list", "--resource=configmaps"
    )
    kubectl(
        "create",
        "rolebinding",
        "-n",
        namespace,
        "reader",
        "--role=cm-reader",
        f"--serviceaccount={namespace}:reader",
    )
    kubectl_image = "registry.k8s.io/kubectl:v1.35.2"
    kubectl.apply(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "reader"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "reader"}},
                "template": {
                    "metadata": {"labels": {"app": "reader"}},
                    "spec": {
                        "serviceAccountName": "reader",
                        "containers": [
                            {
                                "name": "kubectl",
                                "image": kubectl_image,
                                "args": ["get", "configmap", "probe", "-o", "jsonpath={.data.msg}"],
                            }
                        ],
                    },
                },
            },
        },
    )

    def deployment_pods() -> list[dict[str, Any]]:
        return kubectl.items("pods", "-n", namespace, "-l", "app=reader")

    def deployment_pod_log() -> str:
        names = [p["metadata"]["name"] for p in deployment_pods()]
        logs = [pod_log(kubectl, namespace, name, "kubectl") for name in names]
        return next((log for log in logs if "hello-rbac" in log), "")

    assert "hello-rbac" in wait_for(deployment_pod_log, 60, "the Deployment's pod to read")
    pod = deployment_pods()[0]
    mounts = [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts

    # The same identity may not read Secrets: RBAC is enforced on the token.
    kubectl.apply(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "snoop"},
            "spec": {
                "serviceAccountName": "reader",
                "restartPolicy": "Never",
                "containers": [
                    {"name": "kubectl", "image": kubectl_image, "args": ["get", "secret", "hidden"]}
                ],
            },
        },
    )

    def finished_phase() -> str | None:
        phase: str = kubectl.json("pod", "snoop", "-n", namespace)["status"]["phase"]
        return phase if phase in ("Failed", "Succeeded") else None

    assert wait_for(finished_phase, 60, "pod snoop to finish") == "Failed"
    log = pod_log(kubectl, namespace, "snoop", "kubectl")
    assert "Forbidden" in log
    assert f"system:serviceaccount:{namespace}:reader" in log


def test_control_plane_cli_up_and_down(tmp_path: Path) -> None:
    """`make demo` relies on the detached mode: up leaves it running, down stops every process."""
    state = tmp_path / "cp"
    up = cluster_cli("harness.controlplane", "up", "--dir", str(state), timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state / 'admin.kubeconfig'}" in up.stdout
        assert controlplane.is_up(state)
    finally:
        down = cluster_cli("harness.controlplane", "down", "--dir", str(state), timeout=120)
    assert down.returncode == 0, down.stderr
    assert not controlplane.is_up(state)
