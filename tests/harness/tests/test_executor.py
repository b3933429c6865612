"""The pod executor against the real control plane: bare Pods (busybox) as the kubelet runs them.

Each test creates pods in a fresh namespace and reads what a kubelet would report
(pods/status) plus the executor's per-pod log file (there is no ``kubectl logs`` here).
"""

from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from harness.executor import ExecutorProcess
from harness.kube import wait_for

pytestmark = pytest.mark.e2e

TERMINAL = ("Succeeded", "Failed")
HOLD = "nocturne.dev/test-hold"  # keeps a deleted pod visible, like the Job tracking finalizer


@pytest.fixture
def local(executor: ExecutorProcess | None) -> ExecutorProcess:
    """The executor; these tests check its files and kubelet emulation, not kind's kubelet."""
    if executor is None:
        pytest.skip("executor-specific test (a kind cluster runs pods with its own kubelet)")
    return executor


M = TypeVar("M", client.V1Pod, client.V1Secret, client.V1ConfigMap)


def core(kube: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube)


def model(cls: type[M], doc: dict[str, Any]) -> M:
    """A manifest as the client's model (it validates against the API schema)."""
    obj = cls.from_dict(doc)
    assert obj is not None
    return obj


def pod_json(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    pod = core(kube).read_namespaced_pod(name, namespace)
    doc: dict[str, Any] = kube.sanitize_for_serialization(pod)
    return doc


def run_pod(
    kube: client.ApiClient,
    namespace: str,
    script: str,
    *,
    name: str | None = None,
    container: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    **spec: Any,
) -> str:
    """Create a busybox pod running ``sh -c script`` (restartPolicy Never); return its name."""
    name = name or f"p-{secrets.token_hex(3)}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **(metadata or {})},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox:1.37",
                    "command": ["sh", "-c", script],
                    **(container or {}),
                }
            ],
            **spec,
        },
    }
    core(kube).create_namespaced_pod(namespace, model(client.V1Pod, body))
    return name


def finished(
    kube: client.ApiClient, namespace: str, name: str, timeout: float = 60
) -> dict[str, Any]:
    """The pod once its phase is Succeeded or Failed."""

    def done() -> dict[str, Any] | None:
        pod = pod_json(kube, namespace, name)
        return pod if pod.get("status", {}).get("phase") in TERMINAL else None

    return wait_for(done, timeout, f"pod {namespace}/{name} to finish")


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def log_of(executor: ExecutorProcess, namespace: str, name: str) -> str:
    return executor.log_path(namespace, name, "main").read_text()


def succeeded(
    kube: client.ApiClient,
    local: ExecutorProcess,
    namespace: str,
    name: str,
    timeout: float = 60,
) -> tuple[dict[str, Any], str]:
    """The finished pod, which must have Succeeded, and its container's log."""
    pod = finished(kube, namespace, name, timeout)
    assert pod["status"]["phase"] == "Succeeded", (pod["status"], log_of(local, namespace, name))
    return pod, log_of(local, namespace, name)


def test_env_from_secret_config_map_and_field_refs(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    api = core(kube)
    api.create_namespaced_secret(
        namespace,
        model(
            client.V1Secret,
            {
                "metadata": {"name": "creds"},
                "data": {"apikey": base64.b64encode(b"s3cret-value").decode()},
            },
        ),
    )
    settings = {"metadata": {"name": "settings"}, "data": {"LEVEL": "debug", "MODE": "fast"}}
    api.create_namespaced_config_map(namespace, model(client.V1ConfigMap, settings))
    name = run_pod(
        kube,
        namespace,
        'echo "key=$API_KEY level=$LEVEL mode=$CFG_MODE pod=$POD_NAME ns=$POD_NS '
        'app=$APP sa=$SA host=$HOSTNAME api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"',
        metadata={"labels": {"app": "envtest"}},
        container={
            "env": [
                {
                    "name": "API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "apikey"}},
                },
                {
                    "name": "LEVEL",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}},
                },
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {
                    "name": "APP",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
                },
                {
                    "name": "SA",
                    "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
                },
            ],
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        },
    )
    _, log = succeeded(kube, local, namespace, name)
    host_port = str(kube.configuration.host).removeprefix("https://")
    assert log.strip() == (
        f"key=s3cret-value level=debug mode=fast pod={name} ns={namespace} app=envtest "
        f"sa=default host={name} api={host_port}"
    )
    assert "s3cret-value" not in local.executor_log.read_text(), "secret values are never logged"


def test_missing_secret_key_fails_with_config_error(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    empty = {"metadata": {"name": "creds"}, "data": {}}
    core(kube).create_namespaced_secret(namespace, model(client.V1Secret, empty))
    name = run_pod(
        kube,
        namespace,
        "echo never",
        container={
            "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope"}}}]
        },
    )
    pod = finished(kube, namespace, name)
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "CreateContainerConfigError"
    state = terminated(pod)
    assert state["reason"] == "CreateContainerConfigError"
    assert f"couldn't find key nope in Secret {namespace}/creds" in state["message"]


def test_config_map_volume_is_readable_and_sub_path_works(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    agent = {"metadata": {"name": "agent"}, "data": {"config.yaml": "model: small\n", "other": "x"}}
    core(kube).create_namespaced_config_map(namespace, model(client.V1ConfigMap, agent))
    name = run_pod(
        kube,
        namespace,
        "cat /var/run/agent/config.yaml; ls /var/run/agent; cat /run/single/c.yaml; "
        "touch /var/run/agent/new 2>/dev/null || echo volume-read-only",
        container={
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/var/run/agent"},
                {"name": "cfg", "mountPath": "/run/single/c.yaml", "subPath": "config.yaml"},
            ]
        },
        volumes=[{"name": "cfg", "configMap": {"name": "agent"}}],
    )
    _, log = succeeded(kube, local, namespace, name)
    assert log.split() == [
        "model:",
        "small",
        "config.yaml",
        "other",
        "model:",
        "small",
        "volume-read-only",
    ]


def test_termination_message_comes_from_the_termination_log(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube, namespace, 'echo \'{"status": "ok", "costUSD": "0.41"}\' > /dev/termination-log'
    )
    pod = finished(kube, namespace, name)
    assert pod["status"]["phase"] == "Succeeded"
    state = terminated(pod)
    assert state["exitCode"] == 0
    assert state["reason"] == "Completed"
    assert state["message"] == '{"status": "ok", "costUSD": "0.41"}\n'
    assert state["containerID"].startswith("local://")


def test_fallback_to_logs_on_error(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; exit 2",
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    pod = finished(kube, namespace, name)
    assert pod["status"]["phase"] == "Failed"
    state = terminated(pod)
    assert state["exitCode"] == 2
    assert state["reason"] == "Error"
    lines = state["message"].splitlines()
    assert lines[-1] == "oops"
    assert "line 99" in lines
    assert "line 0" not in lines
    assert len(state["message"].encode()) <= 2048


def test_unknown_image_fails_at_once_with_a_clear_reason(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(kube, namespace, "true", container={"image": "ghcr.io/acme/unknown-tool:1"})
    pod = finished(kube, namespace, name, timeout=30)
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "ErrImageNotMapped"
    state = terminated(pod)
    assert state["exitCode"] == 128
    assert state["reason"] == "ErrImageNotMapped"
    assert "ghcr.io/acme/unknown-tool:1" in state["message"]
    assert "image table" in state["message"]


def test_runs_as_non_root_on_a_read_only_root(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "id -u; touch /nocturne-x 2>/dev/null || echo root-read-only; "
        "touch /tmp/scratch && echo tmp-writable",
    )
    _, log = succeeded(kube, local, namespace, name)
    assert log.split() == ["65534", "root-read-only", "tmp-writable"]
    assert not Path("/nocturne-x").exists()


def test_run_as_user_and_read_only_root_filesystem(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "id -u; id -g; touch /tmp/x 2>/dev/null || echo tmp-read-only; "
        "touch /run/data/x && echo data-writable",
        container={
            "securityContext": {"runAsUser": 1234, "readOnlyRootFilesystem": True},
            "volumeMounts": [{"name": "data", "mountPath": "/run/data"}],
        },
        securityContext={"runAsGroup": 2345},
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    _, log = succeeded(kube, local, namespace, name)
    assert log.split() == [
        "1234",
        "2345",
        "tmp-read-only",
        "data-writable",
    ]


def test_log_file_holds_stdout_and_stderr(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(kube, namespace, "echo to-stdout; echo to-stderr >&2")
    finished(kube, namespace, name)
    path = local.log_path(namespace, name, "main")
    assert path == local.state_dir / "pods" / namespace / name / "main.log"
    assert local.log_path(namespace, name) == path
    assert path.read_text().splitlines() == ["to-stdout", "to-stderr"]
    assert f"{namespace}/{name}: claimed" in local.executor_log.read_text()


def test_deleting_a_pod_kills_its_process_and_marks_it_failed(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "echo started; while :; do sleep 0.2; done",
        metadata={"finalizers": [HOLD]},
    )
    api = core(kube)
    try:
        running = wait_for(
            lambda: (
                (p := pod_json(kube, namespace, name))["status"].get("phase") == "Running" and p
            ),
            60,
            "the pod to run",
        )
        pid = int(running["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
        assert Path(f"/proc/{pid}").exists()
        api.delete_namespaced_pod(name, namespace)
        pod = finished(kube, namespace, name, timeout=30)
        assert pod["status"]["phase"] == "Failed"
        assert terminated(pod)["exitCode"] in (143, 137)
        assert terminated(pod)["reason"] == "Error"
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"
        assert not Path(f"/proc/{pid}").exists(), "the container process must be gone"
        assert log_of(local, namespace, name).startswith("started")
    finally:
        api.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": None}})


def test_pod_active_deadline_is_enforced(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "echo started; sleep 120; echo never",
        activeDeadlineSeconds=2,
        terminationGracePeriodSeconds=1,
    )
    pod = finished(kube, namespace, name, timeout=30)
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert "longer than the specified deadline" in pod["status"]["message"]
    assert "never" not in log_of(local, namespace, name)


def test_on_failure_restarts_in_place_with_the_same_empty_dir(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "if [ -e /run/work/once ]; then echo second; exit 0; fi; "
        "touch /run/work/once; echo first; exit 5",
        container={"volumeMounts": [{"name": "work", "mountPath": "/run/work"}]},
        restartPolicy="OnFailure",
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    pod = finished(kube, namespace, name)
    assert pod["status"]["phase"] == "Succeeded"
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 5
    assert log_of(local, namespace, name).split() == ["first", "second"]


def test_projected_service_account_volume_is_mounted(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    name = run_pod(
        kube,
        namespace,
        "cd /var/run/secrets/kubernetes.io/serviceaccount && cat namespace && echo && "
        "test -s token && test -s ca.crt && echo token-and-ca",
    )
    pod, log = succeeded(kube, local, namespace, name)
    assert log.split() == [namespace, "token-and-ca"]
    uid = pod["metadata"]["uid"]
    private = local.pod_dir(namespace, name) / f"uid-{uid}"
    assert not private.exists(), "materialised secrets are removed once the container exits"


def test_python_in_a_pod_gets_a_working_in_cluster_config(
    kube: client.ApiClient, namespace: str, local: ExecutorProcess
) -> None:
    # The same venv interpreter the nocturne images map to, as uid 65534, talking to the real
    # apiserver with the projected token and kube-root-ca.crt (what the operator's pod does).
    script = (
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "review = client.AuthenticationV1Api().create_self_subject_review({})\n"
        "print(review.status.user_info.username)\n"
    )
    name = run_pod(
        kube,
        namespace,
        "unused",
        container={"image": "nocturne-runner:e2e", "command": [sys.executable, "-c", script]},
    )
    _, log = succeeded(kube, local, namespace, name, timeout=90)
    assert log.strip() == f"system:serviceaccount:{namespace}:default"
