"""The runner's run API client against a local TLS server with a throwaway CA: what each answer
means for the run (grant, no grant, refused, unavailable), bounded retries, TLS trust limited to
the operator's CA, and the projected token re-read on every request."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from agent_runner.contract import (
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    FinishReport,
    ProgressReport,
    RunRef,
    StartRequest,
)
from agent_runner.exitcodes import BUDGET_EXHAUSTED, CONFIG_ERROR, TRANSIENT
from agent_runner.runapi import (
    MAX_RESPONSE_BYTES,
    NoGrantError,
    RunApiClient,
    RunApiRefusedError,
    RunApiUnavailableError,
)
from integration.llm_server import free_port
from integration.runapi_server import (
    Answer,
    RunApiServer,
    api_error,
    grant_json,
)
from nocturne_operator.runapi.tls import RunApiTls

TOKEN = "eyJhbGciOiJSUzI1NiJ9.projected-token-one.signature"  # noqa: S105 - a test value
RUN = RunRef(
    namespace="research",
    schedule="news",
    schedule_uid="0b6c9a1e-0000-4000-8000-000000000001",
    job_uid="11111111-2222-3333-4444-555555555555",
    pod_uid="66666666-7777-8888-9999-000000000000",
)
START = StartRequest(run=RUN, started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


@pytest.fixture(scope="module")
def ca() -> RunApiTls:
    return RunApiTls.create(["127.0.0.1", "localhost"])


@pytest.fixture
def server(ca: RunApiTls) -> Iterator[RunApiServer]:
    with RunApiServer(ca) as running:
        yield running


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def client_for(url: str, ca_pem: str, token_file: Path, **options: float) -> RunApiClient:
    options.setdefault("backoff", 0.01)
    options.setdefault("timeout", 2.0)
    return RunApiClient(url, ca_pem, token_file, **options)  # type: ignore[arg-type]


@pytest.fixture
def client(server: RunApiServer, ca: RunApiTls, token_file: Path) -> Iterator[RunApiClient]:
    with client_for(server.url, ca.ca_pem, token_file) as running:
        yield running


def progress(cost: str = "0.01") -> ProgressReport:
    return ProgressReport(
        run=RUN, execution_id=7, cost_usd=Decimal(cost), input_tokens=10, output_tokens=5, steps=1
    )


def test_start_returns_the_grant_and_sends_the_contract_document(
    client: RunApiClient, server: RunApiServer
) -> None:
    server.script(
        START_PATH,
        Answer(json=grant_json(limit="0.25", previous={"state": {"seen": 3}, "output": "old"})),
    )
    grant = client.start(START)
    assert grant.execution_id == 7
    assert grant.limit_usd == Decimal("0.25")
    assert grant.price.output_usd_per_mtok == Decimal("0.60")
    assert grant.previous is not None
    assert grant.previous.state == {"seen": 3}
    [request] = server.requests_to(START_PATH)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["run"]["jobUID"] == RUN.job_uid
    assert body["run"]["scheduleUID"] == RUN.schedule_uid
    assert body["startedAt"].startswith("2026-01-02T03:04:05")


def test_progress_and_finish_are_acknowledged(client: RunApiClient, server: RunApiServer) -> None:
    client.progress(progress("0.0123"))
    client.finish(
        FinishReport(
            run=RUN,
            execution_id=7,
            status="SUCCEEDED",
            completed_at=datetime.now(UTC),
            cost_usd=Decimal("0.0123"),
            input_tokens=10,
            output_tokens=5,
            output="done",
            state={"seen": 4},
        )
    )
    assert server.requests_to(PROGRESS_PATH)[0].json()["costUSD"] == "0.0123"
    finish = server.requests_to(FINISH_PATH)[0].json()
    assert (finish["status"], finish["state"], finish["executionId"]) == (
        "SUCCEEDED",
        {"seen": 4},
        7,
    )


def test_409_is_no_grant_with_the_operator_reason(
    client: RunApiClient, server: RunApiServer
) -> None:
    server.script(
        START_PATH,
        Answer(409, api_error("TotalBudgetReached", "maxTotalUSD 60.00 is spent (60.000000)")),
    )
    with pytest.raises(NoGrantError) as excinfo:
        client.start(START)
    assert excinfo.value.reason == "TotalBudgetReached"
    assert excinfo.value.message == "maxTotalUSD 60.00 is spent (60.000000)"
    assert excinfo.value.exit_code == BUDGET_EXHAUSTED
    assert f"POST {START_PATH}: HTTP 409: TotalBudgetReached" in str(excinfo.value)
    assert len(server.requests_to(START_PATH)) == 1, "a refused grant is not retried"


@pytest.mark.parametrize("status", [400, 403, 422])
def test_client_errors_are_refused_at_once(
    client: RunApiClient, server: RunApiServer, status: int
) -> None:
    server.script(START_PATH, Answer(status, api_error("Forbidden", "pod p is not of Job j")))
    with pytest.raises(RunApiRefusedError) as excinfo:
        client.start(START)
    message = str(excinfo.value)
    assert f"run API POST {START_PATH}: HTTP {status}: Forbidden: pod p is not of Job j" == message
    assert excinfo.value.exit_code == CONFIG_ERROR
    assert len(server.requests) == 1
    assert TOKEN not in message


def test_a_409_on_a_report_is_refused_not_a_grant_question(
    client: RunApiClient, server: RunApiServer
) -> None:
    server.script(PROGRESS_PATH, Answer(409, api_error("RunFinished", "execution 7 is final")))
    with pytest.raises(RunApiRefusedError, match="HTTP 409: RunFinished"):
        client.progress(progress())


def test_503_then_200_is_retried(
    client: RunApiClient, server: RunApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(
        START_PATH,
        Answer(503, api_error("DatabaseUnavailable", "PostgreSQL is not answering")),
        Answer(json=grant_json(execution_id=9)),
    )
    with caplog.at_level(logging.WARNING, logger="agent_runner.runapi"):
        assert client.start(START).execution_id == 9
    assert len(server.requests_to(START_PATH)) == 2
    assert "HTTP 503: DatabaseUnavailable" in caplog.text
    assert TOKEN not in caplog.text


def test_5xx_every_time_is_unavailable_after_bounded_tries(
    client: RunApiClient, server: RunApiServer
) -> None:
    server.route(START_PATH, Answer(500, body=b"<html>Internal Server Error</html>"))
    with pytest.raises(RunApiUnavailableError) as excinfo:
        client.start(START)
    assert len(server.requests_to(START_PATH)) == client.attempts == 6
    assert "HTTP 500 (not an ApiError: '<html>Internal Server Error</html>')" in str(excinfo.value)
    assert "after 6 tries" in str(excinfo.value)
    assert excinfo.value.exit_code == TRANSIENT


def test_connection_refused_is_unavailable_within_seconds(ca: RunApiTls, token_file: Path) -> None:
    with client_for(
        f"https://127.0.0.1:{free_port()}", ca.ca_pem, token_file, backoff=0.1, attempts=3
    ) as client:
        started = time.monotonic()
        with pytest.raises(RunApiUnavailableError) as excinfo:
            client.start(START)
        elapsed = time.monotonic() - started
    assert "ConnectError" in str(excinfo.value)
    assert "after 3 tries" in str(excinfo.value)
    assert 0.4 <= elapsed < 5  # backoff 0.1 + 0.3 between the three tries


def test_default_retries_outlast_a_replica_dying_but_stay_bounded(
    ca: RunApiTls, token_file: Path
) -> None:
    """The defaults (6 tries, 0.25, 0.75, then 2 s apart: about 7 s, long enough for the
    Service to stop sending to a replica that died) against a port nobody listens on."""
    with RunApiClient(f"https://127.0.0.1:{free_port()}", ca.ca_pem, token_file) as client:
        started = time.monotonic()
        with pytest.raises(RunApiUnavailableError, match="after 6 tries"):
            client.progress(progress())
        assert 6.5 <= time.monotonic() - started < 10


def test_timeouts_are_retried_then_unavailable(
    server: RunApiServer, ca: RunApiTls, token_file: Path
) -> None:
    server.route(PROGRESS_PATH, Answer(json={"recorded": True}, delay=1.0))
    with (
        client_for(server.url, ca.ca_pem, token_file, timeout=0.2, attempts=2) as client,
        pytest.raises(RunApiUnavailableError, match="ReadTimeout"),
    ):
        client.progress(progress())
    assert len(server.requests_to(PROGRESS_PATH)) == 2


def test_a_call_deadline_bounds_all_tries(
    server: RunApiServer, ca: RunApiTls, token_file: Path
) -> None:
    server.route(FINISH_PATH, Answer(json={"recorded": True}, delay=2.0))
    report = FinishReport(
        run=RUN,
        execution_id=7,
        status="CANCELLED",
        completed_at=datetime.now(UTC),
        cost_usd=Decimal(0),
        input_tokens=0,
        output_tokens=0,
    )
    with client_for(server.url, ca.ca_pem, token_file, timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(RunApiUnavailableError):
            client.finish(report, deadline=0.5)
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Answer(body=b"this is not JSON"), "HTTP 200 with a body that is not a Grant"),
        (Answer(json={"granted": True}), "Grant.executionId: is required"),
        (Answer(json=grant_json(limit="-1")), 'Grant.limitUSD "-1"'),
    ],
)
def test_a_malformed_answer_is_an_error_not_a_crash(
    client: RunApiClient, server: RunApiServer, answer: Answer, expected: str
) -> None:
    server.route(START_PATH, answer)
    with pytest.raises(RunApiUnavailableError) as excinfo:
        client.start(START)
    assert expected in str(excinfo.value)


def test_an_oversized_answer_is_not_read_whole(client: RunApiClient, server: RunApiServer) -> None:
    server.route(START_PATH, Answer(body=b"{" * (MAX_RESPONSE_BYTES + 1024)))
    with pytest.raises(
        RunApiUnavailableError, match=rf"over {MAX_RESPONSE_BYTES} bytes|-byte answer"
    ):
        client.start(START)


def test_a_certificate_from_another_ca_is_refused_at_tls(
    server: RunApiServer, token_file: Path
) -> None:
    other = RunApiTls.create(["127.0.0.1", "localhost"])
    with (
        client_for(server.url, other.ca_pem, token_file) as client,
        pytest.raises(RunApiRefusedError) as excinfo,
    ):
        client.start(START)
    assert "certificate does not verify against NOCTURNE_RUN_API_CA" in str(excinfo.value)
    assert server.requests == [], "nothing, and no token, reached the server"


def test_the_hostname_is_checked(ca: RunApiTls, token_file: Path) -> None:
    """A certificate of the right CA for another name is refused too."""
    with RunApiServer(ca, hosts=("nocturne-operator.nocturne.svc",)) as elsewhere:
        with (
            client_for(elsewhere.url, ca.ca_pem, token_file) as client,
            pytest.raises(RunApiRefusedError, match="certificate does not verify"),
        ):
            client.start(START)
        assert elsewhere.requests == []


def test_the_system_trust_store_is_not_used(server: RunApiServer, token_file: Path) -> None:
    """Only the given CA is trusted: a bundle of an unrelated CA does not fall back to others."""
    with pytest.raises(RunApiRefusedError, match="not a usable PEM certificate bundle"):
        RunApiClient(
            server.url, "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", token_file
        )
    with pytest.raises(RunApiRefusedError, match="must be https"):
        RunApiClient(server.url.replace("https", "http"), "x", token_file)


def test_the_token_is_read_again_for_every_request(
    client: RunApiClient, server: RunApiServer, token_file: Path
) -> None:
    client.progress(progress("0.01"))
    token_file.write_text("rotated-by-the-kubelet")
    client.progress(progress("0.02"))
    first, second = server.requests_to(PROGRESS_PATH)
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert second.headers["authorization"] == "Bearer rotated-by-the-kubelet"


@pytest.mark.parametrize("content", [None, "", "two words"])
def test_a_missing_or_bad_token_file_is_refused_without_a_request(
    client: RunApiClient, server: RunApiServer, token_file: Path, content: str | None
) -> None:
    if content is None:
        token_file.unlink()
    else:
        token_file.write_text(content)
    with pytest.raises(RunApiRefusedError, match="run API token file"):
        client.start(START)
    assert server.requests == []
