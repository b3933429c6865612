"""The run API's identity check against a real apiserver: a token bound to a runner pod
(TokenRequest, our audience) is accepted for its own run only; the apiserver's default audience,
a wrong schedule UID and another namespace's pod are refused.

The owner chain is built by hand (AgentSchedule -> suspended CronJob -> Job -> the Job
controller's pod); no operator and no kubelet are needed: a Pending pod is a pod."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from agent_runner.contract import TOKEN_AUDIENCE, RunRef
from harness.fixtures import fresh_namespace
from harness.kube import Kubectl, wait_for
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.runapi.auth import Authenticator, RefusalError, RunIdentity, check_run

pytestmark = pytest.mark.e2e

SCHEDULE = "token-check"


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


def _create(kubectl: Kubectl, manifest: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = json.loads(
        kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(manifest))
    )
    return created


def _task(namespace: str, uid: str) -> str:
    return json.dumps(
        {
            "version": 1,
            "schedule": {"namespace": namespace, "name": SCHEDULE, "uid": uid},
            "task": {"query": "check tokens"},
            "agent": {"model": "offline-demo", "provider": "offline", "maxSteps": 1},
            "budget": {"maxPerRunUSD": "0.10"},
            "timeoutSeconds": 60,
        }
    )


def _pod_spec(env: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "containers": [{"name": "runner", "image": "nocturne.invalid/never-pulled:0", "env": env}],
    }


def run_chain(kubectl: Kubectl, namespace: str) -> tuple[dict[str, Any], RunRef]:
    """AgentSchedule -> CronJob -> Job -> pod (made by the Job controller); the pod and the
    RunRef it may report on."""
    schedule = _create(
        kubectl,
        {
            "apiVersion": "nocturne.dev/v1alpha1",
            "kind": "AgentSchedule",
            "metadata": {"name": SCHEDULE, "namespace": namespace},
            "spec": {
                "schedule": "0 9 * * *",
                "task": {"query": "check tokens"},
                "agent": {"model": "offline-demo", "provider": "offline"},
                "budget": {"maxPerRunUSD": "0.10"},
            },
        },
    )
    uid = schedule["metadata"]["uid"]
    template = _pod_spec([{"name": "NOCTURNE_TASK", "value": _task(namespace, uid)}])
    cronjob = _create(
        kubectl,
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {
                "name": SCHEDULE,
                "namespace": namespace,
                "ownerReferences": [_owner(schedule)],
            },
            "spec": {
                "schedule": "0 9 * * *",
                "suspend": True,
                "jobTemplate": {"spec": {"template": {"spec": template}}},
            },
        },
    )
    job = _create(
        kubectl,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{SCHEDULE}-manual",
                "namespace": namespace,
                "ownerReferences": [_owner(cronjob)],
            },
            "spec": {"backoffLimit": 0, "template": {"spec": template}},
        },
    )

    def job_pod() -> dict[str, Any] | None:
        pods = kubectl.items(
            "pods",
            "-n",
            namespace,
            "-l",
            f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}",
        )
        return pods[0] if pods else None

    pod = wait_for(job_pod, 60, f"the Job controller's pod in {namespace}")
    ref = RunRef(
        namespace=namespace,
        schedule=SCHEDULE,
        schedule_uid=uid,
        job_uid=job["metadata"]["uid"],
        pod_uid=pod["metadata"]["uid"],
    )
    return pod, ref


def token(kubectl: Kubectl, pod: dict[str, Any], *, audience: str | None = TOKEN_AUDIENCE) -> str:
    meta = pod["metadata"]
    args = [
        "create",
        "token",
        pod["spec"].get("serviceAccountName") or "default",
        "-n",
        meta["namespace"],
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        meta["name"],
        "--bound-object-uid",
        meta["uid"],
        "--duration",
        "10m",
    ]
    if audience is not None:
        args += ["--audience", audience]
    return kubectl(*args).strip()


def identify(authenticator: Authenticator, value: str) -> RunIdentity:
    return asyncio.run(authenticator.identify(value))


@pytest.fixture
def other_namespace(kubectl: Kubectl) -> Iterator[str]:
    with fresh_namespace(kubectl, f"solo-runapi-other-{secrets.token_hex(3)}") as name:
        yield name


def test_a_pod_bound_token_is_accepted_for_its_own_run_only(
    crds: None,
    kubectl: Kubectl,
    kube: client.ApiClient,
    solo_namespace: str,
    other_namespace: str,
) -> None:
    # No operator serves solo-* namespaces here: it would render a CronJob of its own.
    namespace = solo_namespace
    authenticator = Authenticator(Kube(kube))
    pod, ref = run_chain(kubectl, namespace)

    identity = identify(authenticator, token(kubectl, pod))
    check_run(identity, ref)
    assert (identity.namespace, identity.schedule, identity.pod_name) == (
        namespace,
        SCHEDULE,
        pod["metadata"]["name"],
    )
    assert identity.task.schedule.uid == ref.schedule_uid
    assert identity.task.agent.provider == "offline"

    # The right pod, the wrong schedule UID (an earlier incarnation, say).
    with pytest.raises(RefusalError) as err:
        check_run(identity, ref.model_copy(update={"schedule_uid": "0000-old"}))
    assert err.value.status == 403

    # A token the apiserver itself would accept is useless here.
    with pytest.raises(RefusalError) as err:
        identify(authenticator, token(kubectl, pod, audience=None))
    assert err.value.status == 401

    # A Nocturne-audience token of a pod in another namespace: a run of its own namespace
    # at best, never this one; a pod not run by a schedule gets nothing at all.
    other_pod, other_ref = run_chain(kubectl, other_namespace)
    other = identify(authenticator, token(kubectl, other_pod))
    check_run(other, other_ref)
    with pytest.raises(RefusalError) as err:
        check_run(other, ref)
    assert err.value.status == 403
    bare = _create(
        kubectl,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "bare", "namespace": other_namespace},
            "spec": _pod_spec([]),
        },
    )
    with pytest.raises(RefusalError) as err:
        identify(authenticator, token(kubectl, bare))
    assert err.value.status == 403


def test_a_token_of_a_deleted_pod_is_refused(
    crds: None, kubectl: Kubectl, kube: client.ApiClient, solo_namespace: str
) -> None:
    # No operator serves solo-* namespaces here: it would render a CronJob of its own.
    namespace = solo_namespace
    pod, _ = run_chain(kubectl, namespace)
    value = token(kubectl, pod)
    kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=true")
    with pytest.raises(RefusalError) as err:
        identify(Authenticator(Kube(kube)), value)
    assert err.value.status in {401, 403}
