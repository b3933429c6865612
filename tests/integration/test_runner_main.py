"""`python -m agent_runner` as the Job's container runs it: a real process, a local TLS stand-in
of the operator's run API (the runner's side of the contract; the operator's server has its own
tests), a local LLM wire-protocol server, the termination summary the operator falls back on, and
the exit-code contract. No grant, no spend: without one, no request reaches the LLM server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent_runner import exitcodes
from agent_runner.contract import CHECKPOINT_PATH, FINISH_PATH, PROGRESS_PATH, START_PATH
from agent_runner.summary import Summary, parse_summary
from integration.llm_server import (
    OPENAI_PATH,
    Call,
    ScriptedServer,
    free_port,
    html_page,
    openai_reply,
)
from integration.runapi_server import (
    Answer,
    RunApiServer,
    api_error,
    grant_json,
)
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.render import ScheduleRef, task_document
from nocturne_operator.runapi.tls import RunApiTls

pytestmark = pytest.mark.integration

TOKEN = "projected-token-for-the-runner-pod"  # noqa: S105 - a test value
LLM_KEY = "sk-test-secret"


@pytest.fixture(scope="module")
def ca() -> RunApiTls:
    return RunApiTls.create(["127.0.0.1", "localhost"])


@pytest.fixture
def api(ca: RunApiTls) -> Iterator[RunApiServer]:
    with RunApiServer(ca) as server:
        yield server


@pytest.fixture
def llm() -> Iterator[ScriptedServer]:
    with ScriptedServer() as server:
        yield server


def make_task(**spec: Any) -> str:
    data: dict[str, Any] = {
        "schedule": "0 9 * * *",
        "task": {"query": "What changed?"},
        "agent": {"model": "offline-demo", "provider": "offline"},
        "budget": {"maxPerRunUSD": "0.50"},
        "timeoutSeconds": 120,
    }
    data.update(spec)
    ref = ScheduleRef("news", "research", str(uuid.uuid4()))
    return json.dumps(task_document(ref, AgentScheduleSpec.model_validate(data)))


def openai_task(llm: ScriptedServer, *, tools: tuple[str, ...] = (), **spec: Any) -> str:
    agent = {
        "model": "gpt-4o-mini",
        "provider": "openai",
        "baseURL": f"{llm.url}/v1",
        "apiKeySecretRef": {"name": "k", "key": "k"},
        "tools": list(tools),
    }
    return make_task(agent=agent, **spec)


def runner_env(
    tmp_path: Path, api_url: str, ca_pem: str, task: str, **extra: str
) -> dict[str, str]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    return {
        "PATH": os.environ["PATH"],
        "PYTHONSAFEPATH": "1",
        "NOCTURNE_TASK": task,
        "NOCTURNE_POD_NAME": "news-1-abcde",
        "NOCTURNE_POD_UID": str(uuid.uuid4()),
        "NOCTURNE_JOB_NAME": "news-1",
        "NOCTURNE_JOB_UID": str(uuid.uuid4()),
        "NOCTURNE_RUN_API_URL": api_url,
        "NOCTURNE_RUN_API_CA": ca_pem,
        "NOCTURNE_RUN_API_TOKEN_FILE": str(token),
        "NOCTURNE_LLM_API_KEY": LLM_KEY,
        "NOCTURNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        **extra,
    }


def env_for(tmp_path: Path, api: RunApiServer, task: str, **extra: str) -> dict[str, str]:
    return runner_env(tmp_path, api.url, api.ca.ca_pem, task, **extra)


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_runner"],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def summary_of(env: dict[str, str]) -> Summary:
    summary = parse_summary(Path(env["NOCTURNE_TERMINATION_LOG"]).read_text())
    assert summary is not None
    return summary


def no_secrets(result: subprocess.CompletedProcess[str]) -> None:
    logs = result.stdout + result.stderr
    assert TOKEN not in logs
    assert LLM_KEY not in logs


def test_offline_run_gets_a_grant_and_reports_its_finish(tmp_path: Path, api: RunApiServer) -> None:
    env = env_for(tmp_path, api, make_task())
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    [start] = api.requests_to(START_PATH)
    assert start.headers["authorization"] == f"Bearer {TOKEN}"
    ref = start.json()["run"]
    assert (ref["namespace"], ref["schedule"]) == ("research", "news")
    assert (ref["jobUID"], ref["podUID"]) == (env["NOCTURNE_JOB_UID"], env["NOCTURNE_POD_UID"])
    assert ref["scheduleUID"] == json.loads(env["NOCTURNE_TASK"])["schedule"]["uid"]
    [finish] = api.requests_to(FINISH_PATH)
    report = finish.json()
    assert (report["status"], report["executionId"], report["run"]) == ("SUCCEEDED", 7, ref)
    assert report["output"].startswith("[offline provider]")
    assert report["state"]["runs"] == 1
    summary = summary_of(env)
    assert (summary.status, summary.execution_id, summary.attempt) == ("SUCCEEDED", 7, 0)
    assert summary.history_written is True
    no_secrets(result)


def test_openai_run_spends_within_the_grant_and_reports_progress(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.script(
        START_PATH,
        Answer(
            json=grant_json(
                execution_id=41,
                attempt=1,
                limit="0.20",
                previous={"state": {"seen": ["a"]}, "output": "Two stories yesterday."},
            )
        ),
    )
    llm.route("/news", html_page("Three stories"))
    llm.script(
        OPENAI_PATH,
        openai_reply(calls=[Call("web_fetch", {"url": f"{llm.url}/news"})]),
        openai_reply(
            calls=[
                Call(
                    "finish",
                    {"output": "Three stories today.", "alert": False, "state": {"seen": ["b"]}},
                )
            ]
        ),
    )
    task = openai_task(llm, tools=("web_fetch",), task={"query": "What is new?"})
    env = env_for(tmp_path, api, task, NOCTURNE_WEB_FETCH_ALLOW_PRIVATE="true")
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    first, _second = llm.requests_to(OPENAI_PATH)
    assert first.headers["authorization"] == f"Bearer {LLM_KEY}"
    assert "seen" in first.body.decode(), "the previous state from the grant"
    assert "Two stories yesterday." in first.body.decode()
    assert len(llm.requests_to("/news")) == 1
    reports = [r.json() for r in api.requests_to(PROGRESS_PATH)]
    # Before each model call and after it, and before the tool call: what the run does.
    assert [p.get("activity") for p in reports] == [
        "model call 1/10",
        None,
        "web_fetch 127.0.0.1",
        "model call 2/10",
        None,
    ]
    assert [p["executionId"] for p in reports] == [41] * 5
    before, progress = [reports[0], reports[3]], [reports[1], reports[4]]
    assert reports[2]["reservedUSD"] == "0"
    # After the first step (the fetch), the conversation is checkpointed for a retry.
    [checkpoint] = [r.json() for r in api.requests_to(CHECKPOINT_PATH)]
    assert checkpoint["checkpoint"]["step"] == 1
    assert "Three stories" in json.dumps(checkpoint["checkpoint"]["messages"])
    assert checkpoint["checkpoint"]["toolCalls"] == [
        {"step": 1, "tool": "web_fetch", "target": "127.0.0.1", "ok": True}
    ]
    # Before a call: what it may cost (charged if the pod is killed during it).
    assert all(Decimal(0) < Decimal(p["reservedUSD"]) <= Decimal("0.20") for p in before)
    assert [Decimal(p["reservedUSD"]) for p in progress] == [0, 0]
    assert [p["steps"] for p in progress] == [1, 2]
    costs = [Decimal(p["costUSD"]) for p in progress]
    assert Decimal(0) < costs[0] <= costs[1] <= Decimal("0.20")
    assert Decimal(before[1]["costUSD"]) == costs[0]
    [finish] = api.requests_to(FINISH_PATH)
    report = finish.json()
    assert report["status"] == "SUCCEEDED"
    assert report["output"] == "Three stories today."
    assert report["state"] == {"seen": ["b"]}
    assert Decimal(report["costUSD"]) == costs[1]
    assert report["inputTokens"] == progress[1]["inputTokens"] > 0
    summary = summary_of(env)
    assert (summary.execution_id, summary.attempt) == (41, 1)
    assert summary.cost_usd == costs[1]
    no_secrets(result)


def test_no_grant_409_spends_nothing_and_exits_4(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.script(
        START_PATH,
        Answer(409, api_error("MonthlyBudgetReached", "maxMonthlyUSD 5.00 is spent this month")),
    )
    env = env_for(tmp_path, api, openai_task(llm))
    result = run(env)
    assert result.returncode == exitcodes.BUDGET_EXHAUSTED, result.stderr
    assert llm.requests == [], "no grant, no provider call"
    assert api.requests_to(FINISH_PATH) == []
    summary = summary_of(env)
    assert summary.status == "BUDGET_EXCEEDED"
    assert summary.error is not None
    assert "no budget grant: MonthlyBudgetReached: maxMonthlyUSD 5.00" in summary.error
    assert (summary.cost_usd, summary.execution_id, summary.history_written) == (
        Decimal(0),
        None,
        False,
    )


def test_run_api_down_spends_nothing_and_exits_transient(
    tmp_path: Path, ca: RunApiTls, llm: ScriptedServer
) -> None:
    env = runner_env(tmp_path, f"https://127.0.0.1:{free_port()}", ca.ca_pem, openai_task(llm))
    started = time.monotonic()
    result = run(env)
    assert result.returncode == exitcodes.TRANSIENT, result.stderr
    assert time.monotonic() - started < 20, "bounded retries, then exit"
    assert llm.requests == [], "no grant, no provider call"
    summary = summary_of(env)
    assert summary.status == "FAILED"
    assert summary.error is not None
    assert summary.error.startswith("no budget grant: run API unavailable: ")
    assert summary.cost_usd == 0
    no_secrets(result)


def test_run_api_with_its_database_down_is_unavailable_too(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.route(START_PATH, Answer(503, api_error("DatabaseUnavailable", "PostgreSQL is down")))
    env = env_for(tmp_path, api, openai_task(llm))
    result = run(env)
    assert result.returncode == exitcodes.TRANSIENT, result.stderr
    assert len(api.requests_to(START_PATH)) == 6  # the client's default tries, about 7 s
    assert llm.requests == []
    summary = summary_of(env)
    assert summary.error is not None
    assert "HTTP 503: DatabaseUnavailable: PostgreSQL is down" in summary.error


def test_a_refused_start_is_a_configuration_error(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.script(START_PATH, Answer(403, api_error("Forbidden", "pod is not of a Nocturne Job")))
    env = env_for(tmp_path, api, openai_task(llm))
    result = run(env)
    assert result.returncode == exitcodes.CONFIG_ERROR, result.stderr
    assert llm.requests == []
    summary = summary_of(env)
    assert summary.status == "FAILED"
    assert summary.error is not None
    assert "no budget grant: run API refused: " in summary.error
    assert "HTTP 403: Forbidden" in summary.error


def test_a_bad_task_is_a_configuration_error_before_any_request(
    tmp_path: Path, api: RunApiServer
) -> None:
    env = env_for(tmp_path, api, '{"version": 1, "schedule": {}}')
    result = run(env)
    assert result.returncode == exitcodes.CONFIG_ERROR
    assert api.requests == []
    summary = summary_of(env)
    assert summary.status == "FAILED"
    assert summary.error is not None
    assert summary.error.startswith("configuration error: task document")
    assert "schedule.namespace: is required" in summary.error


def test_a_failing_finish_falls_back_to_the_summary(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.route(FINISH_PATH, Answer(503, api_error("DatabaseUnavailable", "PostgreSQL is down")))
    llm.script(OPENAI_PATH, openai_reply("Three stories today."))
    env = env_for(tmp_path, api, openai_task(llm))
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    # Tries within the final report's 8 s deadline (long enough for a replica to die and the
    # Service to send the next try to the other).
    assert 4 <= len(api.requests_to(FINISH_PATH)) <= 6
    summary = summary_of(env)
    assert (summary.status, summary.execution_id) == ("SUCCEEDED", 7)
    assert summary.history_written is False
    assert summary.output_preview == "Three stories today."
    assert summary.cost_usd > 0
    assert "the termination summary is the fallback" in result.stderr


def test_a_failing_progress_report_does_not_stop_the_run(
    tmp_path: Path, api: RunApiServer, llm: ScriptedServer
) -> None:
    api.route(PROGRESS_PATH, Answer(500, body=b"oops"))
    llm.script(OPENAI_PATH, openai_reply("Three stories today."))
    env = env_for(tmp_path, api, openai_task(llm))
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    assert summary_of(env).history_written is True
    assert "progress report not delivered; the run goes on" in result.stderr


def slow_page(_request: object) -> Any:
    """A page that answers only after the test has sent SIGTERM."""
    time.sleep(15)
    return html_page("late")


@pytest.mark.parametrize("finish_answers", [True, False], ids=["finish", "finish-hangs"])
def test_sigterm_reports_cancelled_with_the_cost_so_far(
    tmp_path: Path, api: RunApiServer, finish_answers: bool
) -> None:
    if not finish_answers:
        api.route(FINISH_PATH, Answer(json={"recorded": True}, delay=10))
    with ScriptedServer() as site:
        site.route("/slow", slow_page)
        task = make_task(
            task={"query": "watch", "context": {"url": f"{site.url}/slow"}},
            agent={"model": "offline-demo", "provider": "offline", "tools": ["web_fetch"]},
        )
        env = env_for(tmp_path, api, task, NOCTURNE_WEB_FETCH_ALLOW_PRIVATE="true")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_runner"],
            env=env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not site.requests_to("/slow") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert site.requests_to("/slow"), "the runner never fetched the page"
        terminated = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - terminated
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 5, "a report that does not answer within ~2 s is left to the summary"
    summary = summary_of(env)
    assert summary.status == "CANCELLED"
    assert summary.execution_id == 7
    assert summary.history_written is finish_answers
    [finish] = api.requests_to(FINISH_PATH)
    report = finish.json()
    assert report["status"] == "CANCELLED"
    assert "SIGTERM" in report["error"]
    assert Decimal(report["costUSD"]) == summary.cost_usd
