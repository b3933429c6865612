"""Checkpoints and runs in flight through the real run API (aiohttp over TLS, real PostgreSQL):
a retry of a Job gets its last checkpoint with the grant, only the Job's own pods write it, a
later step wins, and what the API hears of a run reaches ``status.activeRun``'s store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from agent_runner.contract import (
    CHECKPOINT_LIMIT_BYTES,
    CHECKPOINT_PATH,
    FINISH_PATH,
    PROGRESS_PATH,
    Ack,
    Checkpoint,
    RunOutcome,
)
from integration.test_runapi import (
    RunningApi,
    error_of,
    finish_body,
    granted,
    progress_body,
    ref,
    run_identity,
)
from nocturne_operator.controller.active import ActiveRuns
from nocturne_operator.runapi.auth import RunIdentity
from nocturne_operator.storage import History
from nocturne_operator.storage.schema import RUN_CHECKPOINTS

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def queued() -> list[tuple[tuple[str, str], float]]:
    return []


@pytest.fixture
def active(queued: list[tuple[tuple[str, str], float]]) -> ActiveRuns:
    return ActiveRuns(queue=lambda key, within: queued.append((key, within)), clock=Clock())


@pytest.fixture
def api(history: History, active: ActiveRuns) -> Iterator[RunningApi]:
    running = RunningApi(history, observer=active)
    try:
        yield running
    finally:
        running.close()


def checkpoint(step: int, *, cost: str = "0.01", text: str = "page") -> dict[str, Any]:
    """A checkpoint after ``step`` steps: system, task, then a tool round per step."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "text": "You are an agent."},
        {"role": "user", "text": "news"},
    ]
    for n in range(1, step + 1):
        call = {"id": f"call-{n}", "name": "web_fetch", "arguments": {"url": "https://a.test/x"}}
        messages.append({"role": "assistant", "text": "", "toolCalls": [call]})
        messages.append({"role": "tool", "text": f"{text} {n}", "toolCallId": f"call-{n}"})
    return {
        "step": step,
        "messages": messages,
        "costUSD": cost,
        "inputTokens": 100 * step,
        "outputTokens": 10 * step,
        "toolCalls": [
            {"step": n, "tool": "web_fetch", "target": "a.test", "ok": True}
            for n in range(1, step + 1)
        ],
    }


def send(api: RunningApi, token: str, identity: RunIdentity, execution_id: int, body: Any) -> Any:
    return api.post(
        CHECKPOINT_PATH,
        token,
        {"run": ref(identity), "executionId": execution_id, "checkpoint": body},
    )


def test_a_retry_resumes_from_the_jobs_last_checkpoint(api: RunningApi, history: History) -> None:
    first = run_identity("daily-1", "pod-a")
    token, grant = granted(api, first)
    assert grant.resume is None  # a first attempt starts from the beginning
    for step in (1, 2):
        response = send(api, token, first, grant.execution_id, checkpoint(step, cost="0.02"))
        assert response.status_code == 200, response.text
        assert Ack.model_validate_json(response.content).recorded
    # A late report of an earlier step does not undo the later one.
    stale = send(api, token, first, grant.execution_id, checkpoint(1))
    assert stale.status_code == 200
    assert not Ack.model_validate_json(stale.content).recorded
    # The pod dies without a final report; before its Job's retry gets a grant, the operator
    # records the ended attempt (Recorder.settle_ended_attempts, tested on the cluster).
    history.finish(
        grant.execution_id,
        status=RunOutcome.FAILED,
        completed_at=datetime.now(UTC),
        cost_usd=Decimal("0.02"),
        input_tokens=200,
        output_tokens=20,
        error="the pod ended without a result",
    )
    retry = run_identity("daily-1", "pod-b")
    _, again = granted(api, retry)
    assert again.attempt == 1
    assert again.resume == Checkpoint.model_validate(checkpoint(2, cost="0.02"))
    # Another Job of the schedule starts over.
    _, other = granted(api, run_identity("daily-2"))
    assert other.resume is None
    # The Job finished: nothing resumes from its checkpoint any more.
    assert history.drop_checkpoints([first.job_uid]) == 1
    assert history.load_checkpoint(first.job_uid) is None


def test_only_a_running_attempt_of_the_job_writes_its_checkpoint(
    api: RunningApi, history: History
) -> None:
    mine = run_identity("daily-1", "pod-a")
    token, grant = granted(api, mine)
    # Another Job's pod naming this execution: refused, nothing kept.
    intruder = run_identity("daily-9", "pod-z")
    intruder_token, _ = granted(api, intruder)
    refused = send(api, intruder_token, intruder, grant.execution_id, checkpoint(1))
    assert refused.status_code == 403
    assert history.load_checkpoint(mine.job_uid) is None
    # After its final report the attempt checkpoints no more.
    done = api.post(FINISH_PATH, token, finish_body(mine, grant.execution_id))
    assert done.status_code == 200, done.text
    late = send(api, token, mine, grant.execution_id, checkpoint(3))
    assert late.status_code == 200
    assert not Ack.model_validate_json(late.content).recorded
    assert history.load_checkpoint(mine.job_uid) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (checkpoint(0), "checkpoint.step"),
        ({**checkpoint(1), "messages": []}, "checkpoint.messages"),
        ({**checkpoint(1), "costUSD": "-1"}, "checkpoint.costUSD"),
        ({**checkpoint(1), "messages": [{"role": "root", "text": "x"}]}, "role"),
        (checkpoint(1, text="secret\u0000page"), "NUL"),
    ],
)
def test_a_bad_checkpoint_is_refused_naming_the_field_not_the_text(
    api: RunningApi, history: History, body: dict[str, Any], field: str
) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    response = send(api, token, identity, grant.execution_id, body)
    assert response.status_code == 400
    message = error_of(response).message
    assert field in message
    assert "secret" not in message  # the transcript is never echoed
    assert history.load_checkpoint(identity.job_uid) is None


def test_an_oversized_checkpoint_is_refused_before_it_is_read(api: RunningApi) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    page = "x" * (CHECKPOINT_LIMIT_BYTES // 3)  # each message within its own limit
    response = send(api, token, identity, grant.execution_id, checkpoint(4, text=page))
    assert response.status_code == 413


def test_old_checkpoints_are_purged_as_a_safety_net(api: RunningApi, history: History) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    assert send(api, token, identity, grant.execution_id, checkpoint(1)).status_code == 200
    assert history.purge_checkpoints(timedelta(days=7)) == 0  # fresh: kept
    with history.engine.begin() as conn:
        conn.execute(
            sa.update(RUN_CHECKPOINTS).values(updated_at=datetime.now(UTC) - timedelta(days=8))
        )
    assert history.purge_checkpoints(timedelta(days=7)) == 1
    assert history.load_checkpoint(identity.job_uid) is None


def test_what_the_api_hears_of_a_run_is_its_active_run(
    api: RunningApi, active: ActiveRuns, queued: list[tuple[tuple[str, str], float]]
) -> None:
    identity = run_identity("daily-1")
    key = (identity.namespace, identity.schedule)
    token, grant = granted(api, identity)
    [run] = active.of(key)
    assert (run.job, run.step, run.cost, run.budget) == ("daily-1", 0, Decimal(0), Decimal("1.00"))
    assert queued[-1] == (key, 0.0)  # a start shows at once
    report = progress_body(
        identity, grant.execution_id, costUSD="0.04", steps=2, activity="web_fetch\x1b[2J a.test"
    )
    assert api.post(PROGRESS_PATH, token, report).status_code == 200
    [run] = active.of(key)
    assert (run.step, run.cost) == (2, Decimal("0.04"))
    assert run.activity == "web_fetch [2J a.test"  # no terminal escapes reach status
    assert queued[-1] == (key, active.refresh)  # progress: within the refresh interval
    status = run.status()
    assert status["summary"] == "step 2/5, 0.04 of 1.00 USD"
    assert json.loads(json.dumps(status)) == status  # status is plain JSON
    done = api.post(FINISH_PATH, token, finish_body(identity, grant.execution_id))
    assert done.status_code == 200
    assert active.of(key) == []
    assert queued[-1] == (key, 0.0)
