"""Model providers behind one interface (``Provider.complete``), and the factory that picks one.

There is no fallback: a schedule configured for ``openai`` or ``anthropic`` without a usable key is
a configuration error, never a silent switch to the offline provider.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import httpx
from pydantic import SecretStr

from agent_runner.config import AgentSpec, ConfigError
from agent_runner.providers.anthropic import AnthropicProvider
from agent_runner.providers.base import (
    Completion,
    DeadlineReachedError,
    Message,
    OutcomeUnknownError,
    Provider,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    ToolCall,
    ToolSpec,
    Usage,
)
from agent_runner.providers.offline import OfflineProvider
from agent_runner.providers.openai import OpenAIProvider
from agent_runner.providers.retry import RetryPolicy

__all__ = [
    "AnthropicProvider",
    "Completion",
    "DeadlineReachedError",
    "Message",
    "OfflineProvider",
    "OpenAIProvider",
    "OutcomeUnknownError",
    "Provider",
    "ProviderError",
    "ProviderRejectedError",
    "ProviderUnavailableError",
    "RetryPolicy",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "make_provider",
]


def make_provider(
    agent: AgentSpec,
    *,
    api_key: SecretStr | None,
    retry: RetryPolicy | None = None,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> Provider:
    """The provider ``agent.provider`` names; ConfigError when its API key is missing."""
    if agent.provider == "offline":
        return OfflineProvider(model=agent.model, clock=clock)
    key = api_key.get_secret_value().strip() if api_key is not None else ""
    if not key:
        raise ConfigError(
            f"NOCTURNE_LLM_API_KEY: is required for agent.provider {agent.provider!r} "
            "(set agent.apiKeySecretRef; only the offline provider needs no key)"
        )
    cls: type[AnthropicProvider | OpenAIProvider] = (
        AnthropicProvider if agent.provider == "anthropic" else OpenAIProvider
    )
    return cls(
        model=agent.model,
        api_key=key,
        base_url=agent.base_url,
        retry=retry,
        transport=transport,
        sleep=sleep,
        clock=clock,
        rng=rng,
    )
