"""The provider-neutral conversation, the ``Provider`` interface and its errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agent_runner.exitcodes import TRANSIENT, RunnerError

Role = Literal["system", "user", "assistant", "tool"]

# Completion.stop_reason, normalized across providers (Anthropic's vocabulary).
STOP_END_TURN = "end_turn"
STOP_TOOL_USE = "tool_use"
STOP_MAX_TOKENS = "max_tokens"

# The agent's system prompt wraps what the previous run left in these tags; the offline provider
# reads them back the way a model would.
PREVIOUS_STATE_TAG = "previous_state"
PREVIOUS_OUTPUT_TAG = "previous_output"
# The tool through which the agent ends a run (output, alert, state for the next run).
FINISH_TOOL = "finish"
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD: JSON can carry them escaped
    (``"\\udcff"``), UTF-8 cannot, and every request to a provider is UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def valid_json(value: Any) -> Any:
    """Decoded JSON with ``valid_text`` applied to every string and key."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [valid_json(item) for item in value]
    if isinstance(value, dict):
        return {valid_text(str(key)): valid_json(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: name, what it does, and a JSON Schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made. ``arguments_error`` is set when the model's arguments were not
    a JSON object (``arguments`` is then empty); ``raw_arguments`` keeps OpenAI's string."""

    id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    arguments_error: str | None = None
    raw_arguments: str | None = None

    def arguments_json(self) -> str:
        """The arguments as the model wrote them (JSON text)."""
        if self.raw_arguments is not None:
            return self.raw_arguments
        return json.dumps(dict(self.arguments), ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Message:
    """One conversation turn. ``tool`` messages answer the call ``tool_call_id``."""

    role: Role
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    is_error: bool = False


@dataclass(frozen=True)
class Usage:
    """Tokens the provider says it billed."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Completion:
    """A model response. ``usage`` is None when the provider's usage was missing or malformed
    (the budget then charges the whole reservation)."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    usage: Usage | None
    stop_reason: str


class Provider(Protocol):
    """A chat model behind some wire protocol."""

    @property
    def name(self) -> str:
        """``openai``, ``anthropic`` or ``offline``."""
        ...

    def input_token_bound(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
        """Upper bound of the input tokens ``complete`` would be billed for these arguments."""
        ...

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        max_tokens: int,
        deadline: float,
    ) -> Completion:
        """One model response of at most ``max_tokens`` output tokens, before ``deadline``
        (``time.monotonic()`` seconds)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class ProviderError(RunnerError):
    """The provider failed this call. ``maybe_billed``: the provider may have processed (and
    billed) the request although no usable answer arrived."""

    exit_code = TRANSIENT
    maybe_billed: bool = False

    def __init__(self, message: str, *, maybe_billed: bool = False) -> None:
        super().__init__(message)
        self.maybe_billed = maybe_billed


class ProviderRejectedError(ProviderError):
    """The provider refused the request (HTTP 4xx other than 401/403/404/408/429)."""

    def __init__(self, message: str, *, status: int, error: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class ProviderUnavailableError(ProviderError):
    """Retries on 429/5xx/connection errors ran out (attempts or time); nothing was billed."""


class OutcomeUnknownError(ProviderError):
    """The request was sent but no usable response arrived (read timeout, dropped connection, a
    gateway's 502/504): it may have been billed, so it is not retried within the same
    reservation. ``retry_after``: seconds the server asked to wait, if it said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, maybe_billed=True)
        self.retry_after = retry_after


class DeadlineReachedError(RunnerError):
    """The run's deadline passed before the call could be made or finished."""
