"""Provider wire formats, usage parsing, key redaction, the factory and the offline provider."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import SecretStr

from agent_runner.config import AgentSpec, ConfigError
from agent_runner.providers import (
    AnthropicProvider,
    Message,
    OfflineProvider,
    OpenAIProvider,
    ToolCall,
    ToolSpec,
    Usage,
    make_provider,
)
from agent_runner.providers.anthropic import wire_messages
from agent_runner.providers.base import FINISH_TOOL, DeadlineReachedError
from agent_runner.providers.client import encode, error_detail, redact, usage_from
from agent_runner.providers.offline import LABEL

KEY = "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789"
FETCH = ToolSpec("web_fetch", "Fetch a page.", {"type": "object", "properties": {}})
FINISH = ToolSpec(FINISH_TOOL, "Finish.", {"type": "object", "properties": {}})
CALL = ToolCall(id="c1", name="web_fetch", arguments={"url": "https://example.com/"})
CONVERSATION = [
    Message("system", "You are a background agent."),
    Message("user", "Check https://example.com/ please."),
    Message("assistant", "Fetching.", (CALL,)),
    Message("tool", "URL: https://example.com/\n\nHello", tool_call_id="c1"),
    Message("user", "Last call: finish now."),
]


def agent(**fields: Any) -> AgentSpec:
    data: dict[str, Any] = {"model": "gpt-4o-mini", "provider": "openai", "maxSteps": 5}
    data.update(fields)
    return AgentSpec.model_validate(data)


def test_openai_payload_and_max_tokens_field() -> None:
    official = OpenAIProvider(model="gpt-4o-mini", api_key=KEY)
    body = official.payload(CONVERSATION, [FETCH], 100)
    assert body["max_completion_tokens"] == 100
    assert "max_tokens" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert body["messages"][2]["tool_calls"][0] == {
        "id": "c1",
        "type": "function",
        "function": {"name": "web_fetch", "arguments": '{"url":"https://example.com/"}'},
    }
    assert body["messages"][3] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "URL: https://example.com/\n\nHello",
    }
    assert body["tools"][0]["function"]["name"] == "web_fetch"
    self_hosted = OpenAIProvider(model="llama", api_key=KEY, base_url="http://vllm:8000/v1/")
    assert self_hosted.url == "http://vllm:8000/v1/chat/completions"
    assert self_hosted.payload(CONVERSATION, [], 7)["max_tokens"] == 7
    assert "tools" not in self_hosted.payload(CONVERSATION, [], 7)  # OpenAI refuses []


def test_anthropic_messages_merge_tool_results_and_text() -> None:
    wire = wire_messages(CONVERSATION)
    assert [m["role"] for m in wire] == ["user", "assistant", "user"]
    assert wire[1]["content"] == [
        {"type": "text", "text": "Fetching."},
        {"type": "tool_use", "id": "c1", "name": "web_fetch", "input": {"url": "https://example.com/"}},
    ]  # fmt: skip
    assert wire[2]["content"][0]["type"] == "tool_result"
    assert wire[2]["content"][0]["tool_use_id"] == "c1"
    assert "is_error" not in wire[2]["content"][0]
    assert wire[2]["content"][1] == {"type": "text", "text": "Last call: finish now."}
    errors = wire_messages([Message("tool", "", tool_call_id="x", is_error=True)])
    assert errors[0]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "x",
        "content": "(empty)",
        "is_error": True,
    }
    assert wire_messages([Message("assistant", "")]) == []  # empty turns are dropped


def test_anthropic_payload_puts_system_at_top_level() -> None:
    provider = AnthropicProvider(model="claude-sonnet-4-0", api_key=KEY)
    body = provider.payload(CONVERSATION, [FETCH], 300)
    assert provider.url == "https://api.anthropic.com/v1/messages"
    assert body["system"] == "You are a background agent."
    assert body["max_tokens"] == 300
    assert body["tools"][0] == {
        "name": "web_fetch",
        "description": "Fetch a page.",
        "input_schema": {"type": "object", "properties": {}},
    }


def test_input_bounds_cover_the_whole_request() -> None:
    for provider in (
        OpenAIProvider(model="m", api_key=KEY),
        AnthropicProvider(model="m", api_key=KEY),
    ):
        sent = encode(provider.payload(CONVERSATION, [FETCH], 8192))
        assert provider.input_token_bound(CONVERSATION, [FETCH]) >= len(sent) + 1024
    anthropic = AnthropicProvider(model="m", api_key=KEY)
    with_tools = anthropic.input_token_bound(CONVERSATION, [FETCH])
    without = anthropic.input_token_bound(CONVERSATION, [])
    assert with_tools - without >= 1024  # Anthropic's tool-use system prompt


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5}, Usage(10, 5)),
        ({"prompt_tokens": 10, "completion_tokens": 0}, Usage(10, 0)),
        ({"prompt_tokens": 10}, None),
        ({"prompt_tokens": "10", "completion_tokens": 5}, None),
        ({"prompt_tokens": 10.0, "completion_tokens": 5}, None),
        ({"prompt_tokens": True, "completion_tokens": 5}, None),
        ({"prompt_tokens": -1, "completion_tokens": 5}, None),
        (None, None),
        ([], None),
    ],
)
def test_usage_from_openai(raw: object, expected: Usage | None) -> None:
    assert usage_from(raw, "prompt_tokens", "completion_tokens") == expected


def test_usage_from_anthropic_adds_cache_counts() -> None:
    raw: dict[str, object] = {
        "input_tokens": 10,
        "output_tokens": 3,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": None,
    }
    keys = ("cache_creation_input_tokens", "cache_read_input_tokens")
    assert usage_from(raw, "input_tokens", "output_tokens", *keys) == Usage(15, 3)
    raw["cache_read_input_tokens"] = "x"
    assert usage_from(raw, "input_tokens", "output_tokens", *keys) is None


def test_redact_removes_the_key_and_its_pieces() -> None:
    text = f"Incorrect API key provided: {KEY}. Also {KEY[:12]}***{KEY[-6:]} and sk-other12345678"
    cleaned = redact(text, KEY)
    assert KEY not in cleaned
    assert KEY[:12] not in cleaned
    assert "sk-other12345678" not in cleaned
    assert "Incorrect API key provided" in cleaned


def test_error_detail_reads_both_providers_shapes() -> None:
    openai_body = json.dumps({"error": {"message": f"bad key {KEY}", "code": "invalid_api_key"}})
    message, error = error_detail(openai_body.encode(), KEY)
    assert message == "bad key [redacted]"
    assert error["code"] == "invalid_api_key"
    anthropic_body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}
    assert error_detail(json.dumps(anthropic_body).encode(), KEY)[0] == "slow"
    assert error_detail(b"<html>Bad Gateway</html>", None)[0] == "<html>Bad Gateway</html>"
    assert len(error_detail(b"x" * 5000, None)[0]) == 300


def test_factory_needs_a_key_and_never_falls_back_to_offline() -> None:
    for provider in ("openai", "anthropic"):
        with pytest.raises(ConfigError, match="NOCTURNE_LLM_API_KEY: is required"):
            make_provider(agent(provider=provider), api_key=None)
        with pytest.raises(ConfigError, match="NOCTURNE_LLM_API_KEY"):
            make_provider(agent(provider=provider), api_key=SecretStr("  "))
    assert isinstance(make_provider(agent(), api_key=SecretStr(KEY)), OpenAIProvider)
    built = make_provider(agent(provider="anthropic"), api_key=SecretStr(KEY))
    assert isinstance(built, AnthropicProvider)
    offline = make_provider(agent(provider="offline", model="offline-demo"), api_key=None)
    assert isinstance(offline, OfflineProvider)


def _system(state: dict[str, Any] | None = None, output: str | None = None) -> Message:
    text = "Background run."
    if output is not None:
        text += f"\n<previous_output>\n{output}\n</previous_output>"
    if state is not None:
        text += f"\n<previous_state>\n{json.dumps(state)}\n</previous_state>"
    return Message("system", text)


def test_offline_fetches_urls_once_then_finishes_with_a_label() -> None:
    provider = OfflineProvider()
    deadline = time.monotonic() + 60
    user = Message("user", 'Watch {"pages": ["https://a.example/x", "https://b.example/y"]}')
    first = provider.complete([_system(), user], [FETCH, FINISH], max_tokens=500, deadline=deadline)
    assert [c.arguments["url"] for c in first.tool_calls] == [
        "https://a.example/x",
        "https://b.example/y",
    ]
    assert first.text.startswith(LABEL)
    assistant = Message("assistant", first.text, first.tool_calls)
    results = [
        Message("tool", "page A", tool_call_id=first.tool_calls[0].id),
        Message("tool", "Error: timed out", tool_call_id=first.tool_calls[1].id, is_error=True),
    ]
    conversation = [_system(), user, assistant, *results]
    second = provider.complete(conversation, [FETCH, FINISH], max_tokens=500, deadline=deadline)
    (finish,) = second.tool_calls
    assert finish.name == FINISH_TOOL
    assert str(finish.arguments["output"]).startswith(LABEL)
    assert "https://b.example/y: not fetched: Error: timed out" in finish.arguments["output"]
    assert finish.arguments["alert"] is False
    state = finish.arguments["state"]
    assert state["runs"] == 1
    assert list(state["fingerprints"]) == ["https://a.example/x"]
    again = provider.complete(conversation, [FETCH, FINISH], max_tokens=500, deadline=deadline)
    assert again == second  # deterministic


def test_offline_alerts_when_a_page_changed_since_the_previous_run() -> None:
    provider = OfflineProvider()
    deadline = time.monotonic() + 60
    user = Message("user", "Watch https://a.example/x")
    call = ToolCall(id="f1", name="web_fetch", arguments={"url": "https://a.example/x"})
    state = {"runs": 4, "fingerprints": {"https://a.example/x": "0" * 16}}
    conversation = [
        _system(state, "earlier digest"),
        user,
        Message("assistant", "", (call,)),
        Message("tool", "new content", tool_call_id="f1"),
    ]
    answer = provider.complete(conversation, [FETCH, FINISH], max_tokens=500, deadline=deadline)
    args = answer.tool_calls[0].arguments
    assert args["alert"] is True
    assert args["alert_reason"] == "content changed: https://a.example/x"
    assert args["state"]["runs"] == 5
    assert "Previous run: earlier digest" in args["output"]


def test_offline_answers_in_text_without_tools_and_respects_limits() -> None:
    provider = OfflineProvider()
    messages = [_system(), Message("user", "Summarise https://a.example/ for me")]
    answer = provider.complete(messages, [], max_tokens=5, deadline=time.monotonic() + 9)
    assert answer.tool_calls == ()
    assert answer.text.startswith(LABEL)
    assert "web_fetch is not among the allowed tools" in answer.text
    assert answer.usage is not None
    assert answer.usage.output_tokens <= 5
    assert answer.usage.input_tokens <= provider.input_token_bound(messages, [])
    with pytest.raises(DeadlineReachedError):
        provider.complete(messages, [], max_tokens=5, deadline=time.monotonic() - 1)
