"""The CronJob rendering is pure and carries every fenced-in limit, the Job's own task snapshot
and the run API's address, CA and pod-bound token — and no database credential."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from agent_runner import exitcodes
from agent_runner.contract import TOKEN_AUDIENCE, parse_task_document
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.render import (
    RunApiEndpoint,
    ScheduleRef,
    cronjob_name,
    manual_job_name,
    render_cronjob,
    render_job_template,
    starting_deadline_seconds,
)
from nocturne_operator.settings import Settings

REF = ScheduleRef("daily-ai-news", "research", "0b6c9a1e-0000-4000-8000-000000000001")
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
RUN_API = RunApiEndpoint("https://nocturne-run-api.nocturne-system.svc:8443", CA)


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
        REF,
        spec(**overrides),
        Settings(),
        suspend=False,
        min_interval=timedelta(days=1),
        run_api=RUN_API,
    )


def env_of(cj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {e["name"]: e for e in pod["containers"][0]["env"]}


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
            "values": [exitcodes.CONFIG_ERROR, exitcodes.BUDGET_EXHAUSTED],
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
    env = env_of(cronjob())
    assert env["NOCTURNE_LLM_API_KEY"] == {
        "name": "NOCTURNE_LLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-credentials", "key": "OPENAI_API_KEY"}},
    }
    assert all("value" not in e or "KEY" not in e["name"] for e in env.values())
    # The operator is PostgreSQL's only client: no database URL, no Secret of it, reaches a pod.
    secret_refs = [e for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})]
    assert [e["name"] for e in secret_refs] == ["NOCTURNE_LLM_API_KEY"]
    assert not any("DATABASE" in name or "postgres" in str(e) for name, e in env.items())


def test_runner_reports_to_the_run_api_with_a_pod_bound_token_of_its_own_audience() -> None:
    cj = cronjob()
    env = env_of(cj)
    assert env["NOCTURNE_RUN_API_URL"]["value"] == RUN_API.url
    assert env["NOCTURNE_RUN_API_CA"]["value"] == CA
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [source] = volumes["run-api-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == TOKEN_AUDIENCE
    assert source["serviceAccountToken"]["expirationSeconds"] == 3600
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    token_file = env["NOCTURNE_RUN_API_TOKEN_FILE"]["value"]
    assert token_file.startswith(mounts["run-api-token"]["mountPath"] + "/")
    assert mounts["run-api-token"]["readOnly"] is True
    # Still no Kubernetes API token and no ConfigMap: the Job carries what it runs.
    assert pod["automountServiceAccountToken"] is False
    assert not any("configMap" in v for v in pod["volumes"])


def test_offline_provider_gets_no_key() -> None:
    offline = spec(agent={"model": "offline-demo", "provider": "offline"})
    cj = render_cronjob(REF, offline, Settings(), suspend=False, min_interval=None, run_api=RUN_API)
    assert "NOCTURNE_LLM_API_KEY" not in env_of(cj)


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


def test_each_job_carries_its_task_snapshot_and_no_secrets() -> None:
    text = env_of(cronjob())["NOCTURNE_TASK"]["value"]
    task = json.loads(text)
    assert task["task"] == {"query": "digest", "context": {"max_sources": 10}}
    assert task["budget"] == {"maxPerRunUSD": "2.00"}
    assert task["agent"]["model"] == "gpt-4o-mini"
    assert task["schedule"] == {"namespace": REF.namespace, "name": REF.name, "uid": REF.uid}
    assert "apiKeySecretRef" not in text
    # The runner's and the run API's parser accept what the operator renders.
    assert parse_task_document(text).budget.max_per_run_usd == 2


def test_a_spec_edit_changes_the_snapshot_of_new_jobs_only() -> None:
    """The snapshot lives in the Job template: Jobs already created (and their retries) keep
    the one they were created with; only Jobs created from the new template see the edit."""
    before = render_job_template(REF, spec(), Settings(), RUN_API)
    after = render_job_template(REF, spec(task={"query": "changed"}), Settings(), RUN_API)
    assert before != after
    envs = [
        {e["name"]: e.get("value") for e in t["spec"]["template"]["spec"]["containers"][0]["env"]}
        for t in (before, after)
    ]
    assert json.loads(envs[0]["NOCTURNE_TASK"])["task"]["query"] == "digest"
    assert json.loads(envs[1]["NOCTURNE_TASK"])["task"]["query"] == "changed"


def test_rendering_is_deterministic() -> None:
    assert json.dumps(cronjob(), sort_keys=True) == json.dumps(cronjob(), sort_keys=True)


def test_suspend_is_decided_by_the_caller() -> None:
    cj = render_cronjob(REF, spec(), Settings(), suspend=True, min_interval=None, run_api=RUN_API)
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


def test_no_price_table_travels_to_runners() -> None:
    """Prices live with the operator; each grant carries the run's price."""
    settings = Settings(price_table_file="/run/nocturne/prices/prices.yaml")
    cj = render_cronjob(REF, spec(), settings, suspend=False, min_interval=None, run_api=RUN_API)
    assert not any("PRICE" in name for name in env_of(cj))
