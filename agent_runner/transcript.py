"""A run's conversation on the wire and back: what a checkpoint carries (``contract.Checkpoint``)
so that a retry of the Job goes on where the last completed step left off.

Texts a model or a page wrote are made storable (no NUL, no lone surrogate) on the way out; a
checkpoint that comes back is the operator's copy of what this Job sent, checked by the
contract like every other document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from agent_runner.contract import (
    ToolCallBrief,
    TranscriptMessage,
    TranscriptToolCall,
    storable_text,
)
from agent_runner.providers.base import Message, ToolCall

__all__ = ["brief", "from_transcript", "to_transcript"]

_TARGET_CHARS = 256


def _storable(value: Any) -> Any:
    """A JSON value with every string made storable (arguments come from the model)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, Mapping):
        return {storable_text(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _text(text: str | None) -> str | None:
    return None if text is None else storable_text(text)


def _call_out(call: ToolCall) -> TranscriptToolCall:
    return TranscriptToolCall(
        id=storable_text(call.id),
        name=storable_text(call.name),
        arguments=_storable(dict(call.arguments)),
        arguments_error=_text(call.arguments_error),
        raw_arguments=_text(call.raw_arguments),
    )


def to_transcript(messages: Iterable[Message]) -> tuple[TranscriptMessage, ...]:
    """The conversation as a checkpoint carries it."""
    return tuple(
        TranscriptMessage(
            role=m.role,
            text=storable_text(m.text),
            tool_calls=tuple(_call_out(c) for c in m.tool_calls),
            tool_call_id=_text(m.tool_call_id),
            is_error=m.is_error,
        )
        for m in messages
    )


def from_transcript(messages: Sequence[TranscriptMessage]) -> list[Message]:
    """The conversation a checkpoint carried, as the agent loop holds it."""
    return [
        Message(
            m.role,
            m.text,
            tuple(
                ToolCall(
                    c.id,
                    c.name,
                    dict(c.arguments),
                    arguments_error=c.arguments_error,
                    raw_arguments=c.raw_arguments,
                )
                for c in m.tool_calls
            ),
            tool_call_id=m.tool_call_id,
            is_error=m.is_error,
        )
        for m in messages
    ]


def _target(call: ToolCall) -> str | None:
    """What a call was aimed at, safe to show: the host of a ``url`` argument (no path, query
    or credentials: they may carry what a page slipped in)."""
    url = call.arguments.get("url") if not call.arguments_error else None
    if not isinstance(url, str):
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return storable_text(host)[:_TARGET_CHARS] if host else None


def brief(call: ToolCall, *, step: int, ok: bool) -> ToolCallBrief:
    """One tool call in brief, for people reading the run."""
    return ToolCallBrief(
        step=min(step, 10_000), tool=storable_text(call.name)[:128], target=_target(call), ok=ok
    )
