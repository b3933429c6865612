"""The real provider clients against a local server speaking the OpenAI and Anthropic wire
protocols: requests, tool calls, usage, retries honouring Retry-After, and error mapping."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Iterator

import pytest

from agent_runner.config import ConfigError
from agent_runner.providers import (
    AnthropicProvider,
    Message,
    OpenAIProvider,
    OutcomeUnknownError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RetryPolicy,
    ToolCall,
    ToolSpec,
    Usage,
)
from agent_runner.providers.base import DeadlineReachedError
from integration.llm_server import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    Call,
    Reply,
    ScriptedServer,
    anthropic_reply,
    error_reply,
    free_port,
    openai_reply,
    running,
)

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789abcdefghijklmnopqrstuv"
FETCH = ToolSpec(
    "web_fetch",
    "Fetch a page.",
    {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
)
MESSAGES = [Message("system", "Background run."), Message("user", "What changed?")]
FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


_OPEN: list[OpenAIProvider | AnthropicProvider] = []


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    yield from running()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Sleeps:
    """Records requested sleeps without sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def openai(
    server: ScriptedServer | str, sleeps: Sleeps | None = None, *, real_sleep: bool = False
) -> OpenAIProvider:
    base = server if isinstance(server, str) else f"{server.url}/v1"
    provider = OpenAIProvider(
        model="gpt-4o-mini",
        api_key=KEY,
        base_url=base,
        retry=FAST,
        sleep=time.sleep if real_sleep else sleeps or Sleeps(),
        rng=random.Random(0),  # noqa: S311 - seeded, reproducible
    )
    _OPEN.append(provider)
    return provider


def anthropic(server: ScriptedServer, sleeps: Sleeps | None = None) -> AnthropicProvider:
    provider = AnthropicProvider(
        model="claude-sonnet-4-0",
        api_key=KEY,
        base_url=server.url,
        retry=FAST,
        sleep=sleeps or Sleeps(),
        rng=random.Random(0),  # noqa: S311 - seeded, reproducible
    )
    _OPEN.append(provider)
    return provider


def deadline(seconds: float = 10) -> float:
    return time.monotonic() + seconds


def test_openai_request_and_text_answer(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, openai_reply("Nothing changed."))
    provider = openai(server)
    completion = provider.complete(MESSAGES, [FETCH], max_tokens=123, deadline=deadline())
    assert completion.text == "Nothing changed."
    assert completion.tool_calls == ()
    assert completion.stop_reason == "end_turn"
    (request,) = server.requests_to(OPENAI_PATH)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["model"] == "gpt-4o-mini"
    assert body["max_tokens"] == 123  # a self-hosted baseURL gets the widely supported field
    assert body["messages"] == [
        {"role": "system", "content": "Background run."},
        {"role": "user", "content": "What changed?"},
    ]
    assert body["tools"][0]["function"]["name"] == "web_fetch"
    assert completion.usage is not None
    assert completion.usage.input_tokens <= provider.input_token_bound(MESSAGES, [FETCH])
    assert provider.input_token_bound(MESSAGES, [FETCH]) >= len(request.body)


def test_openai_tool_call_round_trip(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply(calls=[Call("web_fetch", {"url": "https://a.test/"}, id="call_a")]),
        openai_reply(calls=[Call("web_fetch", "{not json", id="call_b")]),
    )
    provider = openai(server)
    first = provider.complete(MESSAGES, [FETCH], max_tokens=100, deadline=deadline())
    (call,) = first.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == (
        "call_a",
        "web_fetch",
        {"url": "https://a.test/"},
    )
    assert first.stop_reason == "tool_use"
    conversation = [
        *MESSAGES,
        Message("assistant", first.text, first.tool_calls),
        Message("tool", "page text", tool_call_id="call_a"),
    ]
    second = provider.complete(conversation, [FETCH], max_tokens=100, deadline=deadline())
    assert second.tool_calls[0].arguments_error is not None
    assert second.tool_calls[0].raw_arguments == "{not json"
    sent = server.requests_to(OPENAI_PATH)[1].json()["messages"]
    assert sent[2]["tool_calls"][0]["function"]["arguments"] == '{"url": "https://a.test/"}'
    assert sent[3] == {"role": "tool", "tool_call_id": "call_a", "content": "page text"}


def test_openai_switches_the_max_tokens_field_when_refused(server: ScriptedServer) -> None:
    unsupported = Reply(
        status=400,
        json={
            "error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        },
    )
    server.script(OPENAI_PATH, unsupported, openai_reply("ok"), openai_reply("again"))
    provider = openai(server)
    assert provider.complete(MESSAGES, [], max_tokens=50, deadline=deadline()).text == "ok"
    assert provider.complete(MESSAGES, [], max_tokens=50, deadline=deadline()).text == "again"
    fields = [
        "max_tokens" in r.json() or "max_completion_tokens" in r.json()
        for r in server.requests_to(OPENAI_PATH)
    ]
    assert fields == [True, True, True]
    later = [r.json() for r in server.requests_to(OPENAI_PATH)[1:]]
    assert all(body["max_completion_tokens"] == 50 and "max_tokens" not in body for body in later)


def test_retry_after_seconds_is_honoured(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, error_reply(429, "slow down", retry_after="2"), openai_reply("ok"))
    sleeps = Sleeps()
    completion = openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert completion.text == "ok"
    assert sleeps.delays == [2.0]
    assert len(server.requests_to(OPENAI_PATH)) == 2


def test_retry_after_http_date_is_honoured(server: ScriptedServer) -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    server.script(OPENAI_PATH, error_reply(503, "busy", retry_after=when), openai_reply("ok"))
    sleeps = Sleeps()
    openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    (delay,) = sleeps.delays
    assert 1.0 < delay <= 3.0


def test_real_sleep_of_a_short_retry_after(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, error_reply(429, retry_after_ms="300"), openai_reply("ok"))
    provider = openai(server, real_sleep=True)
    started = time.monotonic()
    provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert time.monotonic() - started >= 0.3


def test_refusals_before_processing_are_retried_with_backoff(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, error_reply(429), error_reply(529), openai_reply("ok"))
    sleeps = Sleeps()
    completion = openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert completion.text == "ok"
    assert len(sleeps.delays) == 2
    assert 0.005 <= sleeps.delays[0] <= 0.01
    assert 0.01 <= sleeps.delays[1] <= 0.02


def test_retries_are_bounded(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, *[error_reply(503, "overloaded", retry_after="0") for _ in range(4)])
    sleeps = Sleeps()
    with pytest.raises(ProviderUnavailableError, match="HTTP 503 overloaded; gave up after 4"):
        openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert len(sleeps.delays) == 3
    assert server.pending(OPENAI_PATH) == 0


def test_no_retry_past_the_deadline(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, error_reply(429, retry_after="30"))
    sleeps = Sleeps()
    with pytest.raises(ProviderUnavailableError, match="would pass the run's deadline"):
        openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline(5))
    assert sleeps.delays == []
    server.script(OPENAI_PATH, error_reply(429, retry_after="3600"))
    with pytest.raises(ProviderUnavailableError, match="Retry-After 3600s is too long"):
        openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline(9999))
    with pytest.raises(DeadlineReachedError):
        openai(server).complete(MESSAGES, [], max_tokens=10, deadline=time.monotonic() - 1)


def test_connection_refused_is_retried_then_unavailable() -> None:
    sleeps = Sleeps()
    provider = openai(f"http://127.0.0.1:{free_port()}/v1", sleeps)
    with pytest.raises(ProviderUnavailableError, match=r"connection failed \(ConnectError\)"):
        provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert len(sleeps.delays) == 3


@pytest.mark.parametrize(
    "reply",
    [
        error_reply(502, "bad gateway"),
        error_reply(504, "gateway timeout", retry_after="1"),
        error_reply(500, "internal error"),
        error_reply(503, "upstream connect error or disconnect/reset before headers"),
        Reply(status=502, body=b"<html>502 Bad Gateway</html>", headers={"content-type": "x"}),
    ],
    ids=["502", "504", "500", "503-without-retry-after", "502-html"],
)
def test_gateway_errors_may_follow_a_billed_generation(
    server: ScriptedServer, reply: Reply
) -> None:
    # A gateway answers 502/504 when the provider was too slow or dropped the connection — after
    # it may have generated (and billed) the answer. Retrying under the same reservation would
    # leave that generation out of the ledger: the agent charges it and reserves anew instead.
    server.script(OPENAI_PATH, reply, openai_reply("not reached"))
    sleeps = Sleeps()
    with pytest.raises(OutcomeUnknownError, match="may have been processed") as excinfo:
        openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert excinfo.value.maybe_billed
    assert server.pending(OPENAI_PATH) == 1
    assert sleeps.delays == []


def test_lost_response_is_an_unknown_outcome_not_retried(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, Reply(drop=True), openai_reply("not reached"))
    with pytest.raises(OutcomeUnknownError) as excinfo:
        openai(server).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert excinfo.value.maybe_billed
    assert server.pending(OPENAI_PATH) == 1


def test_slow_response_past_the_deadline(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, Reply(delay=1.5, json={}))
    started = time.monotonic()
    with pytest.raises(OutcomeUnknownError, match="ReadTimeout"):
        openai(server).complete(MESSAGES, [], max_tokens=10, deadline=deadline(0.4))
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (401, ConfigError, r"NOCTURNE_LLM_API_KEY: openai .* answered HTTP 401"),
        (403, ConfigError, "HTTP 403"),
        (404, ConfigError, r"agent.model/agent.baseURL: .*HTTP 404 \(unknown model"),
        (400, ProviderRejectedError, "HTTP 400"),
        (422, ProviderRejectedError, "HTTP 422"),
    ],
)
def test_client_errors_are_not_retried_and_never_echo_the_key(
    server: ScriptedServer,
    caplog: pytest.LogCaptureFixture,
    status: int,
    error: type[Exception],
    match: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(OPENAI_PATH, error_reply(status, f"Incorrect API key provided: {KEY}"))
    sleeps = Sleeps()
    with pytest.raises(error, match=match) as excinfo:
        openai(server, sleeps).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert KEY not in str(excinfo.value)
    assert KEY[:16] not in str(excinfo.value)
    assert "[redacted]" in str(excinfo.value)
    assert KEY not in caplog.text
    assert sleeps.delays == []


def test_retry_logs_never_echo_the_key(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(OPENAI_PATH, error_reply(429, f"key {KEY} is rate limited"), openai_reply("ok"))
    openai(server).complete(MESSAGES, [], max_tokens=10, deadline=deadline())
    assert "retry 1/3" in caplog.text
    assert KEY not in caplog.text


def test_malformed_usage_and_bodies(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply("a", usage={"prompt_tokens": "many", "completion_tokens": 3}),
        openai_reply("b", usage=None),
        Reply(body=b"not json", headers={"content-type": "application/json"}),
        Reply(json={"choices": []}),
    )
    provider = openai(server)
    assert provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline()).usage is None
    assert provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline()).usage is None
    for _ in range(2):
        with pytest.raises(ProviderError) as excinfo:
            provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline())
        assert excinfo.value.maybe_billed


def test_anthropic_request_tool_use_and_usage(server: ScriptedServer) -> None:
    server.script(
        ANTHROPIC_PATH,
        anthropic_reply(
            "Let me look.",
            [Call("web_fetch", {"url": "https://a.test/"}, id="toolu_1")],
            usage={
                "input_tokens": 50,
                "output_tokens": 20,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 5,
            },
        ),
        anthropic_reply("Done."),
    )
    provider = anthropic(server)
    first = provider.complete(MESSAGES, [FETCH], max_tokens=200, deadline=deadline())
    assert first.text == "Let me look."
    assert first.tool_calls == (
        ToolCall(id="toolu_1", name="web_fetch", arguments={"url": "https://a.test/"}),
    )
    assert first.stop_reason == "tool_use"
    assert first.usage == Usage(55, 20)
    request = server.requests_to(ANTHROPIC_PATH)[0]
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    body = request.json()
    assert body["system"] == "Background run."
    assert body["max_tokens"] == 200
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What changed?"}]}
    ]
    assert body["tools"][0]["input_schema"]["required"] == ["url"]
    conversation = [
        *MESSAGES,
        Message("assistant", first.text, first.tool_calls),
        Message("tool", "blocked", tool_call_id="toolu_1", is_error=True),
    ]
    second = provider.complete(conversation, [FETCH], max_tokens=200, deadline=deadline())
    assert second.text == "Done."
    assert second.usage is not None
    assert second.usage.input_tokens <= provider.input_token_bound(conversation, [FETCH])
    sent = server.requests_to(ANTHROPIC_PATH)[1].json()["messages"]
    assert sent[1]["content"][1]["type"] == "tool_use"
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "blocked", "is_error": True}
    ]


def test_anthropic_overloaded_is_retried_and_auth_is_config(server: ScriptedServer) -> None:
    overloaded = Reply(
        status=529,
        json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    server.script(ANTHROPIC_PATH, overloaded, anthropic_reply("ok"))
    sleeps = Sleeps()
    provider = anthropic(server, sleeps)
    assert provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline()).text == "ok"
    assert len(sleeps.delays) == 1
    unauthorized = Reply(
        status=401,
        json={"type": "error", "error": {"type": "authentication_error", "message": "bad key"}},
    )
    server.script(ANTHROPIC_PATH, unauthorized)
    with pytest.raises(ConfigError, match=r"anthropic .* HTTP 401 .*bad key"):
        provider.complete(MESSAGES, [], max_tokens=10, deadline=deadline())


def test_lone_surrogates_in_an_answer_never_break_the_next_request(server: ScriptedServer) -> None:
    # JSON can escape a lone surrogate ("\udcff"); UTF-8 cannot encode it, so echoing the answer
    # back in the next request raised UnicodeEncodeError and crashed the run.
    call = Call("finish", {"output": "out \ud800", "alert": False})
    server.script(OPENAI_PATH, openai_reply("text \udcff", [call]))
    server.script(ANTHROPIC_PATH, anthropic_reply("text \udcff", [call]))
    for provider in (openai(server), anthropic(server)):
        completion = provider.complete(MESSAGES, [FETCH], max_tokens=100, deadline=deadline())
        assert completion.text == "text \ufffd"
        assert completion.tool_calls[0].arguments["output"] == "out \ufffd"
        follow_up = [*MESSAGES, Message("assistant", completion.text, completion.tool_calls)]
        assert provider.input_token_bound(follow_up, [FETCH]) > 0
