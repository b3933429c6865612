"""The CronJob and ConfigMap renderings are pure and carry every fenced-in limit."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from nocturne_operator.api import AgentScheduleSpec
from nocturne_operator.render import (
    EXIT_BUDGET_EXHAUSTED,
    EXIT_CONFIG_ERROR,
    ScheduleRef,
    cronjob_name,
    manual_job_name,
    render_cronjob,
    render_task_configmap,
    starting_deadline_seconds,
    task_configmap_name,
)
from nocturne_operator.settings import Settings

REF = ScheduleRef("daily-ai-news", "research", "0b6c9a1e-0000-4000-8000-000000000001")


def spec(**overrides: Any) -> AgentScheduleSpec:
    data: dict[str, Any] = {
        "schedule": "0 9 * * *",
        "timeZone": "Asia/Tokyo",
        "task": {"query": "digest", "context": {"max_sources": 10}},
        "agent": {
            "model": "gpt-4o-mini",
            "apiKeySecretRef": {"name": "llm-credentials", "key": "OPENAI_API_KEY"},
            "tools": ["web_fetch"],
        },
        "budget": {"maxPerRunUSD": "2.00"},
        "timeoutSeconds": 900,
        "retries": 1,
    }
    data.update(overrides)
    return AgentScheduleSpec.model_validate(data)


def cronjob(**overrides: Any) -> dict[str, Any]:
    return render_cronjob(
        REF, spec(**overrides), Settings(), suspend=False, min_interval=timedelta(days=1)
    )


def test_cronjob_carries_schedule_zone_deadline_and_retries() -> None:
    cj = cronjob()
    assert cj["metadata"]["name"] == "daily-ai-news"
    assert cj["spec"]["schedule"] == "0 9 * * *"
    assert cj["spec"]["timeZone"] == "Asia/Tokyo"
    assert cj["spec"]["suspend"] is False
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    job = cj["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 900
    assert job["backoffLimit"] == 1
    assert job["ttlSecondsAfterFinished"] == 3 * 86400


def test_non_retryable_exit_codes_fail_the_job_at_once() -> None:
    rules = cronjob()["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": "runner",
            "operator": "In",
            "values": [EXIT_CONFIG_ERROR, EXIT_BUDGET_EXHAUSTED],
        },
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_pod_is_hardened_and_holds_no_api_credentials() -> None:
    pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(container["resources"]) == {"requests", "limits"}


def test_credentials_only_as_secret_key_refs() -> None:
    pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NOCTURNE_LLM_API_KEY"] == {
        "name": "NOCTURNE_LLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-credentials", "key": "OPENAI_API_KEY"}},
    }
    assert "secretKeyRef" in env["NOCTURNE_DATABASE_URL"]["valueFrom"]
    assert all("value" not in e or "KEY" not in e["name"] for e in env.values())


def test_offline_provider_gets_no_key() -> None:
    offline = spec(agent={"model": "offline-demo", "provider": "offline"})
    cj = render_cronjob(REF, offline, Settings(), suspend=False, min_interval=None)
    env = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "NOCTURNE_LLM_API_KEY" not in {e["name"] for e in env}


def test_owned_by_the_schedule() -> None:
    [owner] = cronjob()["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "name": REF.name,
        "uid": REF.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_task_configmap_has_the_task_and_no_secrets() -> None:
    cm = render_task_configmap(REF, spec())
    assert cm["metadata"]["name"] == task_configmap_name(REF.name)
    task = json.loads(cm["data"]["task.json"])
    assert task["task"] == {"query": "digest", "context": {"max_sources": 10}}
    assert task["budget"] == {"maxPerRunUSD": "2.00"}
    assert task["agent"]["model"] == "gpt-4o-mini"
    assert "apiKeySecretRef" not in json.dumps(task)


def test_rendering_is_deterministic() -> None:
    assert json.dumps(cronjob(), sort_keys=True) == json.dumps(cronjob(), sort_keys=True)


def test_suspend_is_decided_by_the_caller() -> None:
    cj = render_cronjob(REF, spec(), Settings(), suspend=True, min_interval=None)
    assert cj["spec"]["suspend"] is True


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (timedelta(minutes=60), 1800),
        (timedelta(days=1), 3600),
        (timedelta(minutes=1), 60),
        (None, 300),
    ],
)
def test_starting_deadline_is_derived_from_the_interval(
    interval: timedelta | None, expected: int
) -> None:
    assert starting_deadline_seconds(spec(), interval) == expected


def test_explicit_starting_deadline_wins() -> None:
    assert starting_deadline_seconds(spec(startingDeadlineSeconds=42), timedelta(days=1)) == 42


def test_long_names_are_shortened_without_collisions() -> None:
    a, b = "x" * 60 + "-alpha", "x" * 60 + "-bravo"
    assert len(cronjob_name(a)) <= 52
    assert cronjob_name(a) != cronjob_name(b)
    assert cronjob_name("short") == "short"
    assert len(manual_job_name(a, "request-1")) <= 63
    assert manual_job_name(a, "r1") == manual_job_name(a, "r1")
    assert manual_job_name(a, "r1") != manual_job_name(a, "r2")


def test_the_cluster_price_table_travels_with_the_task() -> None:
    settings = Settings(price_table_file="/run/nocturne/prices/prices.yaml")
    cm = render_task_configmap(REF, spec(), prices="version: 7\n")
    assert cm["data"]["prices.yaml"] == "version: 7\n"
    cj = render_cronjob(REF, spec(), settings, suspend=False, min_interval=None)
    env = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "NOCTURNE_PRICE_TABLE", "value": "/run/nocturne/task/prices.yaml"} in env
    assert "prices.yaml" not in render_task_configmap(REF, spec())["data"]
