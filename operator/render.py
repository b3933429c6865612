"""Rendering an AgentSchedule into the CronJob that runs it.

Each Job carries its own task snapshot (env ``NOCTURNE_TASK`` in the Job template), so every
attempt of a Job runs the task the Job was created with, whatever the spec says later. The runner
reports to the run API with a projected token bound to its pod (audience ``TOKEN_AUDIENCE``) and
verifies the API's certificate with the operator's CA, which travels in the template too.

Pure functions: no I/O, same input -> same output, so they are unit-tested directly and the
reconciler can compare desired with actual objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from agent_runner import exitcodes
from agent_runner.contract import ENV_TASK, TOKEN_AUDIENCE, TOKEN_DIR, TOKEN_FILE
from nocturne_operator.api.model import API_VERSION, KIND, AgentScheduleSpec, Provider
from nocturne_operator.settings import Settings

MAX_CRONJOB_NAME = 52  # the CronJob controller appends an 11-character suffix to Job names
LABEL_SCHEDULE = "nocturne.dev/schedule"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "nocturne-operator"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_MANUAL_REQUEST = "nocturne.dev/manual-request"


RUNNER_UID = 65532
RUN_RECORD_FINALIZER = "nocturne.dev/run-record"
"""On every runner pod until the operator has recorded its attempt in history."""


@dataclass(frozen=True)
class RunApiEndpoint:
    """Where runner pods report, and the CA bundle that proves it is the operator."""

    url: str
    ca_pem: str


@dataclass(frozen=True)
class ScheduleRef:
    """Identity of the AgentSchedule that owns the rendered objects."""

    name: str
    namespace: str
    uid: str


def cronjob_name(schedule_name: str) -> str:
    """The CronJob's name: the schedule's name, or, if longer than 52 characters, a prefix plus a
    hash of the full name, so two long names never collide."""
    if len(schedule_name) <= MAX_CRONJOB_NAME:
        return schedule_name
    digest = hashlib.sha256(schedule_name.encode()).hexdigest()[:8]
    return f"{schedule_name[: MAX_CRONJOB_NAME - 9].rstrip('-.')}-{digest}"


def legacy_task_configmap_name(schedule_name: str) -> str:
    """The ConfigMap earlier versions rendered per schedule (one fixed name, so a spec edit
    changed what a retrying Job read); removed once the CronJob no longer mounts it."""
    return f"{cronjob_name(schedule_name)}-task"


def manual_job_name(schedule_name: str, request_id: str) -> str:
    """Deterministic Job name for a run-now request, so a repeated request creates nothing new."""
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:8]
    return f"{cronjob_name(schedule_name)}-m{digest}"


def owner_reference(ref: ScheduleRef) -> dict[str, Any]:
    """ownerReference to the AgentSchedule: garbage collection deletes what it owns."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(ref: ScheduleRef) -> dict[str, str]:
    """Labels on everything rendered for a schedule."""
    return {
        "app.kubernetes.io/name": "nocturne-runner",
        LABEL_COMPONENT: "agent-run",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_SCHEDULE: ref.name,
    }


def task_document(ref: ScheduleRef, spec: AgentScheduleSpec) -> dict[str, Any]:
    """What the runner needs to run one agent run; no secrets (keys come as secretKeyRef env)."""
    agent = spec.agent
    return {
        "version": 1,
        "schedule": {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid},
        "task": spec.task.model_dump(mode="json", by_alias=True, exclude_none=True),
        "agent": {
            "model": agent.model,
            "provider": agent.provider.value,
            "baseURL": agent.base_url,
            "tools": list(agent.tools),
            "allowRestrictedOperations": list(agent.allow_restricted_operations),
            "maxSteps": agent.max_steps,
        },
        "budget": spec.budget.model_dump(mode="json", by_alias=True, exclude_none=True),
        "timeoutSeconds": spec.timeout_seconds,
        "timeZone": spec.time_zone,
    }


def starting_deadline_seconds(spec: AgentScheduleSpec, min_interval: timedelta | None) -> int:
    """The user's value, or half the shortest interval clamped to [60 s, 1 h]: a missed run may
    still start late, but never so late that it runs into the next slot."""
    if spec.starting_deadline_seconds is not None:
        return spec.starting_deadline_seconds
    if min_interval is None:
        return 300
    return int(max(60, min(3600, min_interval.total_seconds() // 2)))


def render_cronjob(
    ref: ScheduleRef,
    spec: AgentScheduleSpec,
    settings: Settings,
    *,
    suspend: bool,
    min_interval: timedelta | None,
    run_api: RunApiEndpoint,
) -> dict[str, Any]:
    """The CronJob that runs the schedule; ``suspend`` is decided by the reconciler (user pause,
    invalid spec, exhausted budget)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": cronjob_name(ref.name),
            "namespace": ref.namespace,
            "labels": labels(ref),
            "ownerReferences": [owner_reference(ref)],
        },
        "spec": {
            "schedule": spec.schedule,
            "timeZone": spec.time_zone,
            "suspend": suspend,
            "concurrencyPolicy": spec.concurrency_policy,
            "startingDeadlineSeconds": starting_deadline_seconds(spec, min_interval),
            "successfulJobsHistoryLimit": settings.successful_jobs_history_limit,
            "failedJobsHistoryLimit": settings.failed_jobs_history_limit,
            "jobTemplate": render_job_template(ref, spec, settings, run_api),
        },
    }


def render_job_template(
    ref: ScheduleRef, spec: AgentScheduleSpec, settings: Settings, run_api: RunApiEndpoint
) -> dict[str, Any]:
    """The CronJob's jobTemplate: deadline, retries, non-retryable exits, hardened pod."""
    return {
        "metadata": {"labels": labels(ref)},
        "spec": {
            "activeDeadlineSeconds": spec.timeout_seconds,
            "backoffLimit": spec.retries,
            "ttlSecondsAfterFinished": settings.job_ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "runner",
                            "operator": "In",
                            # The runner's exit-code contract, which the runner owns.
                            "values": list(exitcodes.NON_RETRYABLE),
                        },
                    },
                    # Evictions and preemptions are not the agent's fault: do not count them.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": labels(ref),
                    # The pod (and its summary) stays until the operator recorded it, even
                    # when the CronJob prunes the finished Job while the operator is down.
                    "finalizers": [RUN_RECORD_FINALIZER],
                },
                "spec": _pod_spec(ref, spec, settings, run_api),
            },
        },
    }


def _pod_spec(
    ref: ScheduleRef, spec: AgentScheduleSpec, settings: Settings, run_api: RunApiEndpoint
) -> dict[str, Any]:
    res = settings.runner_resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # The agent reads untrusted pages: it must hold no Kubernetes credentials. Its only
        # token is the projected one below, whose audience the apiserver does not accept.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "runner",
                "image": settings.runner_image,
                "imagePullPolicy": settings.runner_image_pull_policy,
                "env": _env(ref, spec, settings, run_api),
                "resources": {
                    "requests": {"cpu": res.cpu_request, "memory": res.memory_request},
                    "limits": {"cpu": res.cpu_limit, "memory": res.memory_limit},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "run-api-token", "mountPath": TOKEN_DIR, "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the pod's own emptyDir
                ],
            }
        ],
        "volumes": [
            {
                "name": "run-api-token",
                "projected": {
                    "defaultMode": 0o400,
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": TOKEN_AUDIENCE,
                                "expirationSeconds": settings.runner_token_expiration_seconds,
                                "path": TOKEN_FILE,
                            }
                        }
                    ],
                },
            },
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    if settings.runner_service_account:
        pod["serviceAccountName"] = settings.runner_service_account
    return pod


def _env(
    ref: ScheduleRef, spec: AgentScheduleSpec, settings: Settings, run_api: RunApiEndpoint
) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    task = json.dumps(task_document(ref, spec), sort_keys=True, separators=(",", ":"))
    env: list[dict[str, Any]] = [
        {"name": ENV_TASK, "value": task},
        {"name": "NOCTURNE_POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "NOCTURNE_POD_UID", "valueFrom": field_ref("metadata.uid")},
        {
            "name": "NOCTURNE_JOB_NAME",
            "valueFrom": field_ref("metadata.labels['batch.kubernetes.io/job-name']"),
        },
        {
            "name": "NOCTURNE_JOB_UID",
            "valueFrom": field_ref("metadata.labels['batch.kubernetes.io/controller-uid']"),
        },
        {"name": "NOCTURNE_RUN_API_URL", "value": run_api.url},
        {"name": "NOCTURNE_RUN_API_CA", "value": run_api.ca_pem},
        {"name": "NOCTURNE_RUN_API_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_FILE}"},
    ]
    if settings.web_fetch_allow_private:
        env.append({"name": "NOCTURNE_WEB_FETCH_ALLOW_PRIVATE", "value": "true"})
    key_ref = spec.agent.api_key_secret_ref
    if spec.agent.provider is not Provider.OFFLINE and key_ref is not None:
        env.append(
            {
                "name": "NOCTURNE_LLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": key_ref.name, "key": key_ref.key}},
            }
        )
    return env
