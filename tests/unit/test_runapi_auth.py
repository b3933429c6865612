"""The run API's identity checks that need no apiserver: TokenReview status, the owner chain
given the objects, the RunRef comparison, the JWT expiry and the identity cache."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent_runner.contract import TOKEN_AUDIENCE, RunRef, parse_task_document
from nocturne_operator.runapi.auth import (
    IdentityCache,
    RefusalError,
    RunIdentity,
    TokenSubject,
    check_run,
    identity_from_objects,
    token_expiry,
    token_subject,
)

NS = "research"
NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def task_json(namespace: str = NS, name: str = "daily", uid: str = "sched-uid") -> str:
    return json.dumps(
        {
            "version": 1,
            "schedule": {"namespace": namespace, "name": name, "uid": uid},
            "task": {"query": "news"},
            "agent": {"model": "gpt-4o-mini", "provider": "openai", "maxSteps": 5},
            "budget": {"maxPerRunUSD": "1.00"},
            "timeoutSeconds": 600,
        }
    )


def owner(kind: str, name: str, uid: str, api_version: str = "batch/v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}


def objects(**changes: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pod = {
        "metadata": {
            "name": "daily-1-abc",
            "namespace": NS,
            "uid": "pod-uid",
            "ownerReferences": [owner("Job", "daily-1", "job-uid")],
        },
        "spec": {"serviceAccountName": "default"},
    }
    env = [
        {"name": "NOCTURNE_TASK", "value": changes.pop("task", task_json())},
        {"name": "NOCTURNE_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    ]
    if "manual" in changes:
        env.append({"name": "NOCTURNE_MANUAL_REQUEST", "value": changes.pop("manual")})
    job = {
        "metadata": {
            "name": "daily-1",
            "namespace": NS,
            "uid": "job-uid",
            "ownerReferences": [owner("CronJob", "daily", "cron-uid")],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "runner", "env": env}]}}},
    }
    cronjob = {
        "metadata": {
            "name": "daily",
            "namespace": NS,
            "uid": "cron-uid",
            "ownerReferences": [
                owner("AgentSchedule", "daily", "sched-uid", "nocturne.dev/v1alpha1")
            ],
        },
    }
    assert not changes
    return pod, job, cronjob


SUBJECT = TokenSubject(NS, "default", "daily-1-abc", "pod-uid")


def identity() -> RunIdentity:
    return identity_from_objects(SUBJECT, *objects())


def review(**user: Any) -> dict[str, Any]:
    return {
        "authenticated": True,
        "audiences": [TOKEN_AUDIENCE],
        "user": {
            "username": f"system:serviceaccount:{NS}:default",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["daily-1-abc"],
                "authentication.kubernetes.io/pod-uid": ["pod-uid"],
            },
            **user,
        },
    }


# ---- TokenReview status ----------------------------------------------------------------------


def test_a_pod_bound_service_account_token_names_its_pod() -> None:
    assert token_subject(review()) == SUBJECT


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"authenticated": False}, 401),
        ({**review(), "audiences": ["https://kubernetes.default.svc"]}, 401),
        (review(username="alice"), 403),
        (review(username="system:serviceaccount:research"), 403),
        (review(extra={}), 403),
    ],
    ids=["unauthenticated", "other-audience", "user", "malformed-sa", "not-pod-bound"],
)
def test_anything_else_is_refused(status: dict[str, Any], code: int) -> None:
    with pytest.raises(RefusalError) as err:
        token_subject(status)
    assert err.value.status == code


# ---- the owner chain -------------------------------------------------------------------------


def test_the_chain_names_the_job_the_schedule_and_the_jobs_own_task() -> None:
    pod, job, cronjob = objects(manual="req-7")
    found = identity_from_objects(SUBJECT, pod, job, cronjob)
    assert (found.namespace, found.schedule, found.schedule_uid) == (NS, "daily", "sched-uid")
    assert (found.job_name, found.job_uid, found.pod_uid) == ("daily-1", "job-uid", "pod-uid")
    assert found.task == parse_task_document(task_json())
    assert found.manual_request == "req-7"


def _env(job: dict[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


BREAKS: dict[str, Any] = {
    "pod-recreated": lambda p, j, c: p["metadata"].update(uid="other"),
    "other-service-account": lambda p, j, c: p["spec"].update(serviceAccountName="admin"),
    "pod-not-from-a-job": lambda p, j, c: p["metadata"].update(
        ownerReferences=[owner("ReplicaSet", "rs", "rs-uid", "apps/v1")]
    ),
    "no-controller": lambda p, j, c: p["metadata"]["ownerReferences"][0].update(controller=False),
    "job-recreated": lambda p, j, c: j["metadata"].update(uid="other"),
    "job-not-from-a-cronjob": lambda p, j, c: j["metadata"].update(ownerReferences=[]),
    "cronjob-recreated": lambda p, j, c: c["metadata"].update(uid="other"),
    "cronjob-not-from-a-schedule": lambda p, j, c: c["metadata"].update(
        ownerReferences=[owner("Deployment", "d", "d", "apps/v1")]
    ),
    "schedule-other-group": lambda p, j, c: c["metadata"]["ownerReferences"][0].update(
        apiVersion="evil.dev/v1alpha1"
    ),
    "no-task": lambda p, j, c: _env(j).clear(),
    "bad-task": lambda p, j, c: _env(j)[0].update(value="{"),
    "task-of-another-schedule": lambda p, j, c: _env(j)[0].update(value=task_json(uid="x")),
}


def _break(part: str) -> tuple[Any, Any, Any]:
    pod, job, cronjob = objects()
    if part == "pod-gone":
        return None, job, cronjob
    if part == "job-gone":
        return pod, None, cronjob
    BREAKS[part](pod, job, cronjob)
    return pod, job, cronjob


@pytest.mark.parametrize(
    "part",
    [
        "pod-gone",
        "pod-recreated",
        "other-service-account",
        "pod-not-from-a-job",
        "no-controller",
        "job-recreated",
        "job-gone",
        "job-not-from-a-cronjob",
        "cronjob-recreated",
        "cronjob-not-from-a-schedule",
        "schedule-other-group",
        "no-task",
        "bad-task",
        "task-of-another-schedule",
    ],
)
def test_any_break_in_the_chain_is_403(part: str) -> None:
    with pytest.raises(RefusalError) as err:
        identity_from_objects(SUBJECT, *_break(part))
    assert err.value.status == 403


# ---- RunRef ----------------------------------------------------------------------------------


def run_ref(**overrides: str) -> RunRef:
    values = {
        "namespace": NS,
        "schedule": "daily",
        "scheduleUID": "sched-uid",
        "jobUID": "job-uid",
        "podUID": "pod-uid",
        **overrides,
    }
    return RunRef.model_validate(values)


def test_the_runref_must_name_exactly_the_tokens_run() -> None:
    check_run(identity(), run_ref())
    for field, value in [
        ("namespace", "other-team"),
        ("schedule", "other"),
        ("scheduleUID", "old-incarnation"),
        ("jobUID", "other-job"),
        ("podUID", "other-pod"),
    ]:
        with pytest.raises(RefusalError) as err:
            check_run(identity(), run_ref(**{field: value}))
        assert err.value.status == 403
        # The answer does not confirm what exists elsewhere.
        assert value not in err.value.message


# ---- JWT expiry and the cache ----------------------------------------------------------------


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_token_expiry_reads_exp_without_verifying() -> None:
    exp = int((NOW + timedelta(hours=1)).timestamp())
    assert token_expiry(jwt({"exp": exp, "aud": [TOKEN_AUDIENCE]})) == NOW + timedelta(hours=1)
    assert token_expiry(jwt({"aud": "x"})) is None
    assert token_expiry(jwt({"exp": "soon"})) is None
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.%%%.c") is None


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def test_cache_keeps_an_identity_five_minutes_at_most() -> None:
    clock = Clock()
    cache = IdentityCache(clock=clock)
    token = jwt({"exp": int((NOW + timedelta(hours=1)).timestamp())})
    cache.put(token, identity())
    clock.now += timedelta(seconds=299)
    assert cache.get(token) == identity()
    clock.now += timedelta(seconds=1)
    assert cache.get(token) is None


def test_cache_never_outlives_the_token() -> None:
    clock = Clock()
    cache = IdentityCache(clock=clock)
    token = jwt({"exp": int((NOW + timedelta(seconds=30)).timestamp())})
    cache.put(token, identity())
    assert cache.get(token) is not None
    clock.now += timedelta(seconds=30)
    assert cache.get(token) is None
    # No readable expiry, or expired already: not cached at all.
    cache.put("opaque-token", identity())
    cache.put(jwt({"exp": int(NOW.timestamp()) - 1}), identity())
    assert len(cache) == 0


def test_cache_is_bounded_and_keyed_by_digest() -> None:
    cache = IdentityCache(clock=Clock(), max_entries=2)
    exp = int((NOW + timedelta(hours=1)).timestamp())
    tokens = [jwt({"exp": exp, "n": n}) for n in range(3)]
    for token in tokens:
        cache.put(token, identity())
    assert len(cache) == 2
    assert cache.get(tokens[0]) is None
    assert all(token not in key for token in tokens for key in cache._entries)
