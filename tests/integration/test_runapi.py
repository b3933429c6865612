"""The run API end to end below Kubernetes: the real aiohttp server over real TLS (the client
trusts only the operator's CA), real PostgreSQL. Identities come from a test double that maps
tokens to fixed runs (the TokenReview path is covered by tests/e2e/test_runapi_auth.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from agent_runner.contract import (
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    ApiError,
    Grant,
    RunOutcome,
    parse_task_document,
)
from harness.postgres import running_postgres
from nocturne_operator.adapters.metrics import REGISTRY
from nocturne_operator.prices import load_price_table
from nocturne_operator.runapi.auth import RefusalError, RunIdentity
from nocturne_operator.runapi.server import RunObserver, make_app, serve
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History, upgrade

pytestmark = pytest.mark.integration

NS = "research"


# ---- fixtures --------------------------------------------------------------------------------


def task_json(schedule: str, uid: str, **budget: str) -> str:
    return json.dumps(
        {
            "version": 1,
            "schedule": {"namespace": NS, "name": schedule, "uid": uid},
            "task": {"query": "news"},
            "agent": {"model": "gpt-4o-mini", "provider": "openai", "maxSteps": 5},
            "budget": {"maxPerRunUSD": "1.00", **budget},
            "timeoutSeconds": 600,
            "timeZone": "Asia/Tokyo",
        }
    )


def run_identity(job: str, pod: str = "", *, schedule: str = "daily", **budget: str) -> RunIdentity:
    uid = f"{schedule}-uid"
    return RunIdentity(
        namespace=NS,
        schedule=schedule,
        schedule_uid=uid,
        job_name=job,
        job_uid=f"{job}-uid",
        pod_name=pod or f"{job}-pod",
        pod_uid=f"{pod or job}-pod-uid",
        task=parse_task_document(task_json(schedule, uid, **budget)),
    )


class FixedIdentities:
    """The authenticator test double: token -> a fixed run, anything else 401."""

    def __init__(self) -> None:
        self.by_token: dict[str, RunIdentity] = {}

    async def identify(self, token: str) -> RunIdentity:
        identity = self.by_token.get(token)
        if identity is None:
            raise RefusalError(401, "Unauthenticated", "the token is not valid for the run API")
        return identity


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RunningApi:
    """The server on its own event loop in a thread, and an HTTPS client trusting its CA."""

    def __init__(
        self, history: History | None, *, observer: RunObserver | None = None, **settings: Any
    ) -> None:
        self.identities = FixedIdentities()
        self.writes: list[str] = []  # schedule UIDs whose runs were written
        port = free_port()
        self.settings = Settings(
            run_api_port=port,
            run_api_bind="127.0.0.1",
            run_api_url=f"https://localhost:{port}",
            run_api_hostnames=["127.0.0.1"],
            **settings,
        )
        self.tls = RunApiTls.create(["localhost", "127.0.0.1"])
        self.app = make_app(
            authenticator=self.identities,
            history=history,
            prices=load_price_table(),
            settings=self.settings,
            on_write=self.writes.append,
            observer=observer,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner = self._run(serve(self.app, self.settings, self.tls))
        self.base = f"https://127.0.0.1:{port}"
        self.client = httpx.Client(
            base_url=self.base, verify=ssl.create_default_context(cadata=self.tls.ca_pem)
        )

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=30)

    def close(self) -> None:
        self.client.close()
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def token_for(self, identity: RunIdentity) -> str:
        token = f"token-{uuid.uuid4().hex}"
        self.identities.by_token[token] = identity
        return token

    def post(self, path: str, token: str, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(
            path,
            content=content,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )


@pytest.fixture
def api(history: History) -> Iterator[RunningApi]:
    running = RunningApi(history)
    try:
        yield running
    finally:
        running.close()


def ref(identity: RunIdentity, **overrides: str) -> dict[str, str]:
    return {
        "namespace": identity.namespace,
        "schedule": identity.schedule,
        "scheduleUID": identity.schedule_uid,
        "jobUID": identity.job_uid,
        "podUID": identity.pod_uid,
        **overrides,
    }


def now_text() -> str:
    return datetime.now(UTC).isoformat()


def start(api: RunningApi, identity: RunIdentity, token: str | None = None) -> httpx.Response:
    token = token or api.token_for(identity)
    return api.post(START_PATH, token, {"run": ref(identity), "startedAt": now_text()})


def granted(api: RunningApi, identity: RunIdentity) -> tuple[str, Grant]:
    token = api.token_for(identity)
    response = start(api, identity, token)
    assert response.status_code == 200, response.text
    return token, Grant.model_validate_json(response.content)


def progress_body(identity: RunIdentity, execution_id: int, **fields: Any) -> dict[str, Any]:
    """A progress report of nothing spent yet; ``fields`` add to or replace its fields."""
    return {
        "run": ref(identity),
        "executionId": execution_id,
        "costUSD": "0",
        "inputTokens": 0,
        "outputTokens": 0,
        **fields,
    }


def finish_body(identity: RunIdentity, execution_id: int, **fields: Any) -> dict[str, Any]:
    return {
        "run": ref(identity),
        "executionId": execution_id,
        "status": "SUCCEEDED",
        "completedAt": now_text(),
        "costUSD": "0.10",
        "inputTokens": 100,
        "outputTokens": 50,
        "output": "digest",
        **fields,
    }


def error_of(response: httpx.Response) -> ApiError:
    return ApiError.model_validate_json(response.content)


def requests_total(endpoint: str, code: int) -> float:
    value = REGISTRY.get_sample_value(
        "nocturne_run_api_requests_total", {"endpoint": endpoint, "code": str(code)}
    )
    return value or 0.0


# ---- start = grant ---------------------------------------------------------------------------


def test_start_grants_the_per_run_cap_with_the_models_price(
    api: RunningApi, history: History
) -> None:
    before = requests_total("start", 200)
    identity = run_identity("daily-1")
    _, grant = granted(api, identity)
    assert grant.limit_usd == Decimal("1.00")
    assert grant.attempt == 0
    assert grant.spent_before_usd == 0
    assert (grant.price.model, grant.price.input_usd_per_mtok) == ("gpt-4o-mini", Decimal("0.15"))
    assert grant.previous is None
    row = history.get(grant.execution_id)
    assert row is not None
    assert row.status is RunOutcome.RUNNING
    assert (row.job_uid, row.pod_uid, row.schedule_uid) == (
        identity.job_uid,
        identity.pod_uid,
        identity.schedule_uid,
    )
    assert requests_total("start", 200) == before + 1
    # A replayed start is the same grant, not a second reservation.
    _, again = granted(api, identity)
    assert again == grant


def test_the_cluster_cap_bounds_the_schedules_per_run_cap(history: History) -> None:
    running = RunningApi(history, max_per_run_usd=Decimal("0.25"))
    try:
        _, grant = granted(running, run_identity("daily-1"))
    finally:
        running.close()
    assert grant.limit_usd == Decimal("0.25")


def test_no_budget_left_is_409_and_the_attempt_is_recorded_budget_exceeded(
    api: RunningApi, history: History
) -> None:
    first = run_identity("daily-1", maxTotalUSD="0.50")
    token, grant = granted(api, first)
    assert grant.limit_usd == Decimal("0.50")
    body = finish_body(first, grant.execution_id, costUSD="0.50")
    assert api.post(FINISH_PATH, token, body).status_code == 200

    second = run_identity("daily-2", maxTotalUSD="0.50")
    response = start(api, second)
    assert response.status_code == 409
    error = error_of(response)
    assert error.reason == "TotalBudgetReached"
    assert "0.5" in error.message
    (row,) = history.for_job(second.job_uid)
    assert row.status is RunOutcome.BUDGET_EXCEEDED
    assert row.cost_usd == 0


def test_unknown_model_is_422(api: RunningApi) -> None:
    identity = run_identity("daily-1")
    task = identity.task.model_copy(
        update={"agent": identity.task.agent.model_copy(update={"model": "gpt-99"})}
    )
    response = start(api, replace(identity, task=task))
    assert response.status_code == 422
    assert error_of(response).reason == "UnknownModel"


def test_no_database_no_grant(history: History) -> None:
    running = RunningApi(None)
    try:
        response = start(running, run_identity("daily-1"))
    finally:
        running.close()
    assert response.status_code == 503
    assert error_of(response).reason == "HistoryUnavailable"


def test_database_stopped_is_503_and_the_next_start_after_it_is_back_works() -> None:
    with running_postgres() as server:
        upgrade(server.url)
        with History.connect(server.url, connect_timeout=2) as repo:
            running = RunningApi(repo)
            try:
                _, grant = granted(running, run_identity("daily-1"))
                server.stop()
                stopped = start(running, run_identity("daily-2"))
                assert stopped.status_code == 503
                assert error_of(stopped).reason == "HistoryUnavailable"
                # The message is the runner's: no database URL, no password.
                assert server.password not in stopped.text
                assert str(server.port) not in stopped.text
                server.start()
                _, later = granted(running, run_identity("daily-2"))
            finally:
                running.close()
            assert later.execution_id > grant.execution_id
            assert repo.for_job("daily-2-uid")[0].status is RunOutcome.RUNNING


# ---- identity --------------------------------------------------------------------------------


def test_no_or_unknown_token_is_401(api: RunningApi) -> None:
    identity = run_identity("daily-1")
    body = {"run": ref(identity), "startedAt": now_text()}
    assert api.client.post(START_PATH, json=body).status_code == 401
    assert api.post(START_PATH, "forged", body).status_code == 401


@pytest.mark.parametrize("field", ["namespace", "schedule", "scheduleUID", "jobUID", "podUID"])
def test_a_runref_that_is_not_the_tokens_is_403(
    api: RunningApi, history: History, field: str
) -> None:
    identity = run_identity("daily-1")
    token = api.token_for(identity)
    body = {"run": ref(identity, **{field: "other"}), "startedAt": now_text()}
    response = api.post(START_PATH, token, body)
    assert response.status_code == 403
    assert error_of(response).reason == "Forbidden"
    assert history.for_job(identity.job_uid) == []


def test_another_jobs_execution_is_403_on_progress_and_finish(
    api: RunningApi, history: History
) -> None:
    victim = run_identity("daily-1")
    _, grant = granted(api, victim)
    intruder = run_identity("other-1", schedule="other")
    intruder_token, _ = granted(api, intruder)
    progress = progress_body(intruder, grant.execution_id)
    assert api.post(PROGRESS_PATH, intruder_token, progress).status_code == 403
    finish = finish_body(intruder, grant.execution_id, status="FAILED", costUSD="0")
    response = api.post(FINISH_PATH, intruder_token, finish)
    assert response.status_code == 403
    # A missing execution gets the same answer as someone else's.
    missing = api.post(FINISH_PATH, intruder_token, finish_body(intruder, 10**9))
    assert (missing.status_code, missing.json()) == (403, response.json())
    row = history.get(grant.execution_id)
    assert row is not None
    assert row.status is RunOutcome.RUNNING


# ---- bodies ----------------------------------------------------------------------------------


def test_malformed_bodies_are_400_naming_the_field_and_rule(api: RunningApi) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    progress = progress_body(
        identity, grant.execution_id, costUSD="0.01", inputTokens=1, outputTokens=1
    )
    cases = {
        "not json": (b"{not json", "Invalid JSON"),
        "float money": ({**progress, "costUSD": 0.01}, "costUSD 0.01: Value error"),
        "unknown field": ({**progress, "surprise": 1}, "surprise 1: Extra inputs"),
        "missing field": (
            {k: v for k, v in progress.items() if k != "executionId"},
            "executionId: is required",
        ),
    }
    for name, (body, fragment) in cases.items():
        response = api.post(PROGRESS_PATH, token, body)
        assert response.status_code == 400, name
        error = error_of(response)
        assert error.reason == "BadRequest", name
        assert fragment in error.message, (name, error.message)
    assert api.post(PROGRESS_PATH, token, progress).status_code == 200


def test_oversized_bodies_are_413(api: RunningApi) -> None:
    identity = run_identity("daily-1")
    token = api.token_for(identity)
    body = {"run": ref(identity), "startedAt": now_text(), "pad": "x" * 70_000}
    response = api.post(START_PATH, token, body)
    assert response.status_code == 413
    assert error_of(response).reason == "RequestTooLarge"


# ---- progress and finish ---------------------------------------------------------------------


def test_progress_raises_the_recorded_cost(api: RunningApi, history: History) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    body = progress_body(
        identity,
        grant.execution_id,
        costUSD="0.05",
        inputTokens=10,
        outputTokens=5,
        steps=2,
        activity="fetching",
    )
    assert api.post(PROGRESS_PATH, token, body).json() == {"recorded": True}
    row = history.get(grant.execution_id)
    assert row is not None
    assert (row.cost_usd, row.input_tokens) == (Decimal("0.05"), 10)


def test_every_write_of_a_run_is_heard_by_the_statistics_cache(api: RunningApi) -> None:
    """The operator keeps each schedule's run statistics until a run of it is written: start,
    progress and finish each tell it which schedule changed (refused ones too)."""
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    api.post(PROGRESS_PATH, token, progress_body(identity, grant.execution_id, costUSD="0.05"))
    api.post(FINISH_PATH, token, finish_body(identity, grant.execution_id))
    assert api.writes == [identity.schedule_uid] * 3
    other = run_identity("daily-2")
    assert api.post(PROGRESS_PATH, api.token_for(other), progress_body(other, 999_999)).is_error
    assert api.writes == [identity.schedule_uid] * 3  # refused before any write: nothing heard


def test_finish_replay_is_idempotent_and_the_first_final_status_wins(
    api: RunningApi, history: History
) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    body = finish_body(identity, grant.execution_id)
    for _ in range(2):
        response = api.post(FINISH_PATH, token, body)
        assert (response.status_code, response.json()) == (200, {"recorded": True})
    late = finish_body(identity, grant.execution_id, status="FAILED", error="late")
    assert api.post(FINISH_PATH, token, late).status_code == 200
    row = history.get(grant.execution_id)
    assert row is not None
    assert row.status is RunOutcome.SUCCEEDED
    assert (row.cost_usd, row.output, row.error) == (Decimal("0.10"), "digest", None)


def test_state_is_saved_on_success_and_handed_to_the_next_grant(
    api: RunningApi, history: History, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = run_identity("daily-1")
    token, grant = granted(api, first)
    state = {"seen": ["https://example.com/a"], "count": 3}
    body = finish_body(first, grant.execution_id, state=state, output="yesterday's digest")
    assert api.post(FINISH_PATH, token, body).status_code == 200

    _, second = granted(api, run_identity("daily-2"))
    assert second.previous is not None
    assert second.previous.state == state
    assert second.previous.output == "yesterday's digest"
    assert second.spent_before_usd == 0  # another Job's spend is not this Job's
    # Tokens, outputs and state never reach the log.
    assert "granted" in caplog.text
    for secret in (token, "yesterday's digest", "example.com/a"):
        assert secret not in caplog.text


def test_state_too_large_is_422_after_the_run_is_recorded(
    api: RunningApi, history: History
) -> None:
    identity = run_identity("daily-1")
    token, grant = granted(api, identity)
    body = finish_body(identity, grant.execution_id, state={"blob": "x" * 70_000})
    response = api.post(FINISH_PATH, token, body)
    assert response.status_code == 422
    assert error_of(response).reason == "StateTooLarge"
    row = history.get(grant.execution_id)
    assert row is not None
    assert row.status is RunOutcome.SUCCEEDED
    assert history.load_state(NS, "daily") is None


# ---- transport -------------------------------------------------------------------------------


def test_a_client_without_the_operators_ca_is_refused(api: RunningApi) -> None:
    with httpx.Client(base_url=api.base) as stranger, pytest.raises(httpx.ConnectError) as err:
        stranger.get("/healthz")
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    assert api.client.get("/healthz").text == "ok"
    # A name outside the certificate is refused too.
    context = ssl.create_default_context(cadata=api.tls.ca_pem)
    with (
        httpx.Client(base_url=api.base, verify=context) as fresh,
        pytest.raises(httpx.ConnectError) as err,
    ):
        fresh.get("/healthz", extensions={"sni_hostname": "elsewhere.example"})
    assert "match" in str(err.value)
