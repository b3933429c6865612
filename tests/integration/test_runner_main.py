"""`python -m agent_runner` as the Job's container runs it: real process, real PostgreSQL, a local
LLM wire-protocol server, the termination summary the operator reads, and the exit-code contract."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent_runner import exitcodes
from agent_runner.history import ExecutionKey, ExecutionStatus, History, month_start, upgrade
from agent_runner.summary import parse_summary
from integration.llm_server import ScriptedServer, html_page, openai_reply
from integration.postgres import PostgresServer
from nocturne_operator.api import AgentScheduleSpec
from nocturne_operator.render import ScheduleRef, task_document

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db_url(postgres: PostgresServer) -> str:
    """A schema of its own, migrated like the Helm hook will do."""
    url = postgres.fresh_schema("runner_main")
    upgrade(url)
    return url


@pytest.fixture
def history(db_url: str) -> Iterator[History]:
    with History.connect(db_url) as store:
        yield store


def make_task(tmp_path: Path, **spec: Any) -> Path:
    data: dict[str, Any] = {
        "schedule": "0 9 * * *",
        "task": {"query": "What changed?"},
        "agent": {"model": "offline-demo", "provider": "offline"},
        "budget": {"maxPerRunUSD": "0.50"},
        "timeoutSeconds": 120,
    }
    name = spec.pop("name", "news")
    data.update(spec)
    ref = ScheduleRef(name, "research", str(uuid.uuid4()))
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task_document(ref, AgentScheduleSpec.model_validate(data))))
    return path


def runner_env(tmp_path: Path, db_url: str, task: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHONSAFEPATH": "1",
        "NOCTURNE_TASK_FILE": str(task),
        "NOCTURNE_POD_NAME": "news-1-abcde",
        "NOCTURNE_POD_UID": str(uuid.uuid4()),
        "NOCTURNE_JOB_NAME": "news-1",
        "NOCTURNE_JOB_UID": extra.pop("job_uid", str(uuid.uuid4())),
        "NOCTURNE_DATABASE_URL": db_url,
        "NOCTURNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
        **extra,
    }


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


def summary_of(env: dict[str, str]) -> Any:
    summary = parse_summary(Path(env["NOCTURNE_TERMINATION_LOG"]).read_text())
    assert summary is not None
    return summary


def test_offline_run_succeeds_and_is_recorded(
    tmp_path: Path, db_url: str, history: History
) -> None:
    env = runner_env(tmp_path, db_url, make_task(tmp_path))
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    summary = summary_of(env)
    assert summary.status == "SUCCEEDED"
    assert summary.history_written is True
    assert summary.output_preview.startswith("[offline provider]")
    row = history.get(summary.execution_id)
    assert row is not None
    assert row.status == ExecutionStatus.SUCCEEDED
    assert row.job_uid == env["NOCTURNE_JOB_UID"]
    assert row.completed_at is not None
    assert "sk-" not in result.stderr  # nothing secret in logs (there is none to leak here)
    assert env["NOCTURNE_DATABASE_URL"].split("@")[0] not in result.stderr


def test_unknown_model_is_a_configuration_error(tmp_path: Path, db_url: str) -> None:
    task = make_task(
        tmp_path,
        agent={
            "model": "gpt-99-ultra",
            "provider": "openai",
            "apiKeySecretRef": {"name": "k", "key": "k"},
        },
    )
    env = runner_env(tmp_path, db_url, task, NOCTURNE_LLM_API_KEY="sk-test-secret")
    result = run(env)
    assert result.returncode == exitcodes.CONFIG_ERROR
    summary = summary_of(env)
    assert summary.status == "FAILED"
    assert "gpt-99-ultra" in summary.error
    assert "sk-test-secret" not in result.stderr + result.stdout


def test_openai_compatible_run_records_its_cost(
    tmp_path: Path, db_url: str, history: History
) -> None:
    with ScriptedServer() as server:
        server.script("/v1/chat/completions", openai_reply("Three stories today."))
        task = make_task(
            tmp_path,
            agent={
                "model": "gpt-4o-mini",
                "provider": "openai",
                "baseURL": f"{server.url}/v1",
                "apiKeySecretRef": {"name": "k", "key": "k"},
            },
        )
        env = runner_env(tmp_path, db_url, task, NOCTURNE_LLM_API_KEY="sk-test-secret")
        result = run(env)
        assert result.returncode == exitcodes.SUCCEEDED, result.stderr
        [request] = server.requests_to("/v1/chat/completions")
        assert request.headers["authorization"] == "Bearer sk-test-secret"
    summary = summary_of(env)
    assert summary.cost_usd > 0
    assert summary.cost_usd <= Decimal("0.50")
    row = history.get(summary.execution_id)
    assert row is not None
    assert row.cost_usd == summary.cost_usd
    assert row.output == "Three stories today."


def test_retries_share_one_budget(tmp_path: Path, db_url: str, history: History) -> None:
    """An earlier attempt of the same Job spent the whole budget: no model call, exit 4."""
    job_uid = str(uuid.uuid4())
    earlier = history.start(
        ExecutionKey(
            "research", "news", str(uuid.uuid4()), "news-1", job_uid, str(uuid.uuid4()), 0
        ),
        model="gpt-4o-mini",
        provider="openai",
        started_at=datetime.now(UTC),
    )
    history.finish(
        earlier,
        status=ExecutionStatus.FAILED,
        completed_at=datetime.now(UTC),
        cost_usd=Decimal("0.50"),
        input_tokens=1000,
        output_tokens=1000,
        error="provider failed",
    )
    with ScriptedServer() as server:
        task = make_task(
            tmp_path,
            agent={
                "model": "gpt-4o-mini",
                "provider": "openai",
                "baseURL": f"{server.url}/v1",
                "apiKeySecretRef": {"name": "k", "key": "k"},
            },
        )
        env = runner_env(
            tmp_path, db_url, task, job_uid=job_uid, NOCTURNE_LLM_API_KEY="sk-test-secret"
        )
        result = run(env)
        assert server.requests == []
    assert result.returncode == exitcodes.BUDGET_EXHAUSTED
    assert summary_of(env).status == "BUDGET_EXCEEDED"
    assert history.spent_for_job(job_uid) == Decimal("0.50")


def _seed_run(history: History, schedule: str, started_at: datetime, cost: str) -> None:
    job_uid = str(uuid.uuid4())
    run_id = history.start(
        ExecutionKey(
            "research", schedule, str(uuid.uuid4()), f"{schedule}-x", job_uid, str(uuid.uuid4()), 0
        ),
        model="gpt-4o-mini",
        provider="openai",
        started_at=started_at,
    )
    history.finish(
        run_id,
        status=ExecutionStatus.SUCCEEDED,
        completed_at=started_at + timedelta(minutes=1),
        cost_usd=Decimal(cost),
        input_tokens=10,
        output_tokens=10,
    )


def test_monthly_cap_counts_this_month_in_the_schedule_time_zone(
    tmp_path: Path, db_url: str, history: History
) -> None:
    """Spend of earlier months does not count; spend since local midnight on the 1st does,
    even when it is still last month in UTC."""
    tokyo_month = month_start(datetime.now(UTC), "Asia/Tokyo")
    _seed_run(history, "monthly", tokyo_month - timedelta(hours=1), "5.00")
    spec = {
        "name": "monthly",
        "timeZone": "Asia/Tokyo",
        "budget": {"maxPerRunUSD": "0.50", "maxMonthlyUSD": "1.00"},
    }
    env = runner_env(tmp_path, db_url, make_task(tmp_path, **spec))
    assert run(env).returncode == exitcodes.SUCCEEDED, "last month's 5 USD must not count"

    _seed_run(history, "monthly", tokyo_month + timedelta(minutes=30), "1.00")
    env = runner_env(tmp_path, db_url, make_task(tmp_path, **spec))
    result = run(env)
    assert result.returncode == exitcodes.BUDGET_EXHAUSTED, result.stderr
    assert summary_of(env).status == "BUDGET_EXCEEDED"


def slow_page(_request: object) -> Any:
    """A page that answers only after the test has sent SIGTERM."""
    time.sleep(15)
    return html_page("late")


def test_sigterm_records_cancelled_with_cost_so_far(
    tmp_path: Path, db_url: str, history: History
) -> None:
    with ScriptedServer() as site:
        site.route("/slow", slow_page)
        task = make_task(
            tmp_path,
            task={"query": "watch", "context": {"url": f"{site.url}/slow"}},
            agent={"model": "offline-demo", "provider": "offline", "tools": ["web_fetch"]},
        )
        env = runner_env(tmp_path, db_url, task, NOCTURNE_WEB_FETCH_ALLOW_PRIVATE="true")
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
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = summary_of(env)
    assert summary.status == "CANCELLED"
    row = history.get(summary.execution_id)
    assert row is not None
    assert row.status == ExecutionStatus.CANCELLED
    assert row.error is not None
    assert "SIGTERM" in row.error


def test_database_down_still_runs_and_reports_through_the_summary(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"postgresql+psycopg://nocturne:hunter2-secret@127.0.0.1:{port}/nocturne"
    env = runner_env(tmp_path, down, make_task(tmp_path))
    result = run(env)
    assert result.returncode == exitcodes.SUCCEEDED, result.stderr
    summary = summary_of(env)
    assert summary.status == "SUCCEEDED"
    assert summary.history_written is False
    assert summary.execution_id is None
    assert "history unavailable" in result.stderr
    assert "hunter2-secret" not in result.stderr
