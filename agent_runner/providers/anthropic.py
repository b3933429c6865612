"""Anthropic Messages (``POST {baseURL or https://api.anthropic.com}/v1/messages``) with
``tool_use``/``tool_result`` blocks. ``agent.baseURL`` follows the Anthropic SDK's convention
(the host, without ``/v1``), so gateways and proxies work.

We never set ``cache_control``, so no cache writes are billed; if a gateway reports cache
counts anyway they are added to the input (an overstatement for cache reads, which are cheaper).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from agent_runner.budget import input_token_bound
from agent_runner.providers.base import (
    STOP_END_TURN,
    STOP_TOOL_USE,
    Completion,
    Message,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from agent_runner.providers.client import JsonClient, encode, usage_from
from agent_runner.providers.retry import RetryPolicy

DEFAULT_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
# Anthropic adds a tool-use system prompt when tools are offered (at most 530 tokens on any Claude
# model per its docs); bill it into the bound with room to spare.
TOOL_USE_PROMPT_TOKENS = 1024
_BOUND_PLACEHOLDER = 10**9


class AnthropicProvider:
    """The Messages API."""

    name = "anthropic"

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
        self.model = model
        self.url = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/v1/messages"
        self._client = JsonClient(
            provider=self.name,
            url=self.url,
            headers={
                "x-api-key": api_key,
                "anthropic-version": ANTHROPIC_VERSION,
                "accept": "application/json",
            },
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
        """The Messages request body."""
        system = "\n\n".join(m.text for m in messages if m.role == "system" and m.text)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "messages": wire_messages(messages),
        }
        if system:
            body["system"] = system
        if tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
                for t in tools
            ]
        return body

    def input_token_bound(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
        """Upper bound of billed input tokens (see ``agent_runner.budget``)."""
        body = encode(self.payload(messages, tools, _BOUND_PLACEHOLDER))
        return input_token_bound(
            body, messages=len(messages), extra_tokens=TOOL_USE_PROMPT_TOKENS if tools else 0
        )

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        max_tokens: int,
        deadline: float,
    ) -> Completion:
        """One response of at most ``max_tokens`` tokens."""
        data = self._client.post(
            encode(self.payload(messages, tools, max_tokens)), deadline=deadline
        )
        return self._parse(data)

    def _parse(self, data: Mapping[str, Any]) -> Completion:
        content = data.get("content")
        if not isinstance(content, list):
            raise ProviderError(
                f"anthropic {self.url}: response without a content list", maybe_billed=True
            )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for index, block in enumerate(content):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif block.get("type") == "tool_use":
                arguments = block.get("input")
                call_id = str(block.get("id") or f"toolu_{index}")
                name = str(block.get("name", ""))
                if isinstance(arguments, dict):
                    calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
                else:
                    calls.append(
                        ToolCall(
                            id=call_id, name=name, arguments_error="input must be a JSON object"
                        )
                    )
        stop = str(data.get("stop_reason") or (STOP_TOOL_USE if calls else STOP_END_TURN))
        return Completion(
            text="".join(texts),
            tool_calls=tuple(calls),
            usage=usage_from(
                data.get("usage"),
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ),
            stop_reason=stop,
        )


def wire_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as content blocks: tool results go in user turns, consecutive turns of one role
    are merged (the API wants alternating roles), empty turns are dropped."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        blocks: list[dict[str, Any]] = []
        if message.role == "tool":
            role = "user"
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": message.text or "(empty)",
            }
            if message.is_error:
                result["is_error"] = True
            blocks.append(result)
        else:
            role = message.role
            if message.text:
                blocks.append({"type": "text", "text": message.text})
            blocks.extend(
                {"type": "tool_use", "id": c.id, "name": c.name, "input": dict(c.arguments)}
                for c in message.tool_calls
            )
        if not blocks:
            continue
        if wire and wire[-1]["role"] == role:
            wire[-1]["content"].extend(blocks)
        else:
            wire.append({"role": role, "content": blocks})
    return wire
