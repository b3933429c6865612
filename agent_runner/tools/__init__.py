"""The agent's tools: ``web_fetch`` under an SSRF guard, and the restricted-operation policy."""

from __future__ import annotations

from agent_runner.tools.registry import Refusal, ToolRegistry, ToolResult, build_tools
from agent_runner.tools.web_fetch import (
    WebFetcher,
    WebFetchError,
    WebFetchRefusedError,
    WebPage,
    web_fetch,
)

__all__ = [
    "Refusal",
    "ToolRegistry",
    "ToolResult",
    "WebFetchError",
    "WebFetchRefusedError",
    "WebFetcher",
    "WebPage",
    "build_tools",
    "web_fetch",
]
