"""The ``offline`` provider: a deterministic stand-in for a model, for demos and dry runs.

No network and no model: it reads the conversation the way a model would. If ``web_fetch`` is
offered and the task mentions URLs, its first response fetches up to three of them (one round of
tool calls); then it answers through ``finish`` (or as text when ``finish`` is not offered). Its
answer starts with ``[offline provider]`` so nobody mistakes it for a model's work. It keeps a
fingerprint of each page in its state and raises an alert when a page changed since the previous
run — the memory-and-alert loop of a real monitor, reproducible in tests and demos.

Usage is deterministic: a token per 4 bytes of the request and of the answer (within the budget's
input bound, which counts a token per byte).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from agent_runner.budget import input_token_bound
from agent_runner.providers.base import (
    FINISH_TOOL,
    PREVIOUS_OUTPUT_TAG,
    PREVIOUS_STATE_TAG,
    STOP_END_TURN,
    STOP_TOOL_USE,
    Completion,
    DeadlineReachedError,
    Message,
    ToolCall,
    ToolSpec,
    Usage,
)
from agent_runner.providers.client import encode

LABEL = "[offline provider]"
MAX_FETCHES = 3
BYTES_PER_TOKEN = 4
_URL = re.compile(r"https?://[^\s\"'<>\\\[\]()`,]+")
_WEB_FETCH = "web_fetch"


def _tagged(text: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
    return match.group(1) if match else None


def _tokens(data: bytes) -> int:
    return math.ceil(len(data) / BYTES_PER_TOKEN)


class OfflineProvider:
    """Deterministic, network-free, clearly labelled."""

    name = "offline"

    def __init__(self, *, model: str = "offline-demo", clock: Any = time.monotonic) -> None:
        self.model = model
        self._clock = clock

    def close(self) -> None:
        """Nothing to release."""

    def _request_bytes(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> bytes:
        return encode(
            {
                "model": self.model,
                "messages": [asdict(m) for m in messages],
                "tools": [{**asdict(t), "parameters": dict(t.parameters)} for t in tools],
            }
        )

    def input_token_bound(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
        """Upper bound of the input tokens ``complete`` reports."""
        return input_token_bound(self._request_bytes(messages, tools), messages=len(messages))

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        max_tokens: int,
        deadline: float,
    ) -> Completion:
        """The next deterministic step: fetch pages once, then answer."""
        if self._clock() >= deadline:
            raise DeadlineReachedError("offline: the run's deadline passed")
        input_tokens = _tokens(self._request_bytes(messages, tools))
        names = {t.name for t in tools}
        user_text = next((m.text for m in messages if m.role == "user"), "")
        urls = list(dict.fromkeys(_URL.findall(user_text)))[:MAX_FETCHES]
        fetched = any(m.role == "tool" for m in messages)
        if _WEB_FETCH in names and urls and not fetched:
            calls = tuple(
                ToolCall(id=f"offline-fetch-{i}", name=_WEB_FETCH, arguments={"url": url})
                for i, url in enumerate(urls, 1)
            )
            text = f"{LABEL} Fetching {len(calls)} page(s) named in the task."
            output_tokens = min(max_tokens, _tokens(text.encode()) + 16 * len(calls))
            return Completion(
                text=text,
                tool_calls=calls,
                usage=Usage(input_tokens, output_tokens),
                stop_reason=STOP_TOOL_USE,
            )
        answer = self._answer(messages, names, user_text)
        if FINISH_TOOL in names:
            call = ToolCall(id="offline-finish", name=FINISH_TOOL, arguments=answer)
            output_tokens = _tokens(call.arguments_json().encode())
            return Completion(
                text="",
                tool_calls=(call,),
                usage=Usage(input_tokens, min(max_tokens, output_tokens)),
                stop_reason=STOP_TOOL_USE,
            )
        text = str(answer["output"])
        return Completion(
            text=text,
            tool_calls=(),
            usage=Usage(input_tokens, min(max_tokens, _tokens(text.encode()))),
            stop_reason=STOP_END_TURN,
        )

    def _answer(
        self, messages: Sequence[Message], names: set[str], user_text: str
    ) -> dict[str, Any]:
        system = next((m.text for m in messages if m.role == "system"), "")
        previous_state = _load_state(_tagged(system, PREVIOUS_STATE_TAG))
        previous_output = (_tagged(system, PREVIOUS_OUTPUT_TAG) or "").strip()
        before = previous_state.get("fingerprints", {})
        before = before if isinstance(before, dict) else {}

        urls_by_call: dict[str, str] = {}
        for message in messages:
            for call in message.tool_calls:
                if call.name == _WEB_FETCH:
                    urls_by_call[call.id] = str(call.arguments.get("url", ""))
        lines = [
            f"{LABEL} Deterministic demo run: no language model was called.",
            "",
            f"Task: {_first_line(user_text, 300)}",
        ]
        fingerprints: dict[str, str] = {}
        changed: list[str] = []
        results = [m for m in messages if m.role == "tool" and m.tool_call_id in urls_by_call]
        if results:
            lines.append(f"Pages checked: {len(results)}")
        elif _WEB_FETCH in names:
            lines.append("Pages checked: none (no URLs in the task)")
        else:
            lines.append("Pages checked: none (web_fetch is not among the allowed tools)")
        for result in results:
            url = urls_by_call[str(result.tool_call_id)]
            if result.is_error:
                lines.append(f"- {url}: not fetched: {_first_line(result.text, 200)}")
                continue
            fingerprint = hashlib.sha256(result.text.encode()).hexdigest()[:16]
            fingerprints[url] = fingerprint
            if url not in before:
                note = "first check"
            elif before[url] == fingerprint:
                note = "unchanged since the previous run"
            else:
                note = "CHANGED since the previous run"
                changed.append(url)
            lines.append(
                f"- {url}: {len(result.text)} characters, fingerprint {fingerprint} ({note})"
            )
        lines.append(
            f"Previous run: {_first_line(previous_output, 200) if previous_output else 'none'}"
        )
        runs = previous_state.get("runs", 0)
        state = {
            "runs": (runs if isinstance(runs, int) else 0) + 1,
            "fingerprints": {**before, **fingerprints},
        }
        return {
            "output": "\n".join(lines),
            "alert": bool(changed),
            "alert_reason": f"content changed: {', '.join(changed)}" if changed else None,
            "state": state,
        }


def _load_state(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _first_line(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
