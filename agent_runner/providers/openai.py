"""OpenAI-compatible Chat Completions (``POST {baseURL}/chat/completions``): OpenAI itself and
self-hosted servers (vLLM, llama.cpp, Ollama, ...) through ``agent.baseURL``.

The output limit: OpenAI's own API wants ``max_completion_tokens`` (reasoning models refuse the
deprecated ``max_tokens``); self-hosted servers have long accepted ``max_tokens`` and not always
the newer name. So the official endpoint gets ``max_completion_tokens``, any other ``baseURL``
gets ``max_tokens``, and a 400 saying the field is unsupported switches to the other name once
(a rejected request is not billed) and remembers it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent_runner.budget import input_token_bound
from agent_runner.providers.base import (
    STOP_END_TURN,
    STOP_MAX_TOKENS,
    STOP_TOOL_USE,
    Completion,
    Message,
    ProviderError,
    ProviderRejectedError,
    ToolCall,
    ToolSpec,
    valid_json,
)
from agent_runner.providers.client import JsonClient, encode, usage_from
from agent_runner.providers.retry import RetryPolicy

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_COMPLETION_TOKENS = "max_completion_tokens"
MAX_TOKENS = "max_tokens"
_STOP_REASONS = {"stop": STOP_END_TURN, "tool_calls": STOP_TOOL_USE, "length": STOP_MAX_TOKENS}
_BOUND_PLACEHOLDER = 10**9  # as many digits as any real max_tokens


class OpenAIProvider:
    """Chat Completions with function calling."""

    name = "openai"

    def __init__(
        self,
        *,
        model: str,
        api_key: str,
        base_url: str = "",
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.model = model
        self.url = f"{base}/chat/completions"
        official = urlsplit(base).hostname == "api.openai.com"
        self.max_tokens_field = MAX_COMPLETION_TOKENS if official else MAX_TOKENS
        self._client = JsonClient(
            provider=self.name,
            url=self.url,
            headers={"authorization": f"Bearer {api_key}", "accept": "application/json"},
            secret=api_key,
            retry=retry or RetryPolicy(),
            transport=transport,
            sleep=sleep,
            clock=clock,
            rng=rng,
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    def payload(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], max_tokens: int
    ) -> dict[str, Any]:
        """The Chat Completions request body."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [_wire_message(m) for m in messages],
            self.max_tokens_field: max_tokens,
        }
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": dict(t.parameters),
                    },
                }
                for t in tools
            ]
        return body

    def input_token_bound(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
        """Upper bound of billed input tokens (see ``agent_runner.budget``)."""
        body = encode(self.payload(messages, tools, _BOUND_PLACEHOLDER))
        return input_token_bound(body, messages=len(messages))

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        max_tokens: int,
        deadline: float,
    ) -> Completion:
        """One response of at most ``max_tokens`` tokens."""
        try:
            data = self._client.post(
                encode(self.payload(messages, tools, max_tokens)), deadline=deadline
            )
        except ProviderRejectedError as exc:
            if not _unsupported_field(exc, self.max_tokens_field):
                raise
            self.max_tokens_field = (
                MAX_TOKENS
                if self.max_tokens_field == MAX_COMPLETION_TOKENS
                else MAX_COMPLETION_TOKENS
            )
            data = self._client.post(
                encode(self.payload(messages, tools, max_tokens)), deadline=deadline
            )
        return self._parse(data)

    def _parse(self, data: Mapping[str, Any]) -> Completion:
        choices = data.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if not isinstance(first, dict) or not isinstance(message, dict):
            raise ProviderError(
                f"openai {self.url}: response without choices[0].message", maybe_billed=True
            )
        content = message.get("content")
        if isinstance(content, list):  # some servers send content parts
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        text = content if isinstance(content, str) else ""
        calls = []
        for index, raw in enumerate(message.get("tool_calls") or []):
            if not isinstance(raw, dict):
                continue
            function: dict[str, Any] = raw.get("function") or {}
            if not isinstance(function, dict):
                function = {}
            arguments_text = function.get("arguments")
            calls.append(
                _tool_call(
                    call_id=str(raw.get("id") or f"call_{index}"),
                    name=str(function.get("name", "")),
                    arguments_text=arguments_text if isinstance(arguments_text, str) else "",
                )
            )
        finish = str(first.get("finish_reason") or "")
        stop = _STOP_REASONS.get(finish, finish or STOP_END_TURN)
        if calls and stop == STOP_END_TURN:
            stop = STOP_TOOL_USE
        return Completion(
            text=text,
            tool_calls=tuple(calls),
            usage=usage_from(data.get("usage"), "prompt_tokens", "completion_tokens"),
            stop_reason=stop,
        )


def _tool_call(*, call_id: str, name: str, arguments_text: str) -> ToolCall:
    try:
        arguments = valid_json(json.loads(arguments_text)) if arguments_text.strip() else {}
    except ValueError as exc:
        return ToolCall(
            id=call_id,
            name=name,
            arguments_error=f"arguments are not valid JSON: {exc}",
            raw_arguments=arguments_text,
        )
    if not isinstance(arguments, dict):
        return ToolCall(
            id=call_id,
            name=name,
            arguments_error="arguments must be a JSON object",
            raw_arguments=arguments_text,
        )
    return ToolCall(id=call_id, name=name, arguments=arguments, raw_arguments=arguments_text)


def _wire_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.text}
    if message.role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            "content": message.text or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json()},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.text}


def _unsupported_field(exc: ProviderRejectedError, field: str) -> bool:
    if exc.status != 400:
        return False
    error = exc.error
    if error.get("param") == field and error.get("code") in ("unsupported_parameter", None):
        return True
    message = str(error.get("message", "")).lower()
    return field in message and any(
        word in message for word in ("unsupported", "not supported", "unrecognized", "unknown")
    )
