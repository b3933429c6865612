"""The run summary: compact JSON the runner writes to ``/dev/termination-log`` and the operator
reads from the pod's termination message.

The operator learns a run's outcome from it even when PostgreSQL was unreachable, so it must fit
Kubernetes' 4096-byte termination-message limit: ``to_message()`` truncates the text fields
(output preview first, then error) and always returns valid JSON within the limit.
``parse_summary`` is the operator's side: garbage in, ``None`` out, never an exception.

Depends on pydantic and the standard library only, so the operator can share it unchanged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
)

from agent_runner.contract import MAX_USD, RunOutcome, quantize_usd

__all__ = [
    "MESSAGE_LIMIT_BYTES",
    "SUMMARY_VERSION",
    "TERMINATION_LOG",
    "Summary",
    "parse_summary",
    "write_termination_message",
]

log = logging.getLogger(__name__)

MESSAGE_LIMIT_BYTES = 4096
"""Kubernetes keeps at most this many bytes of a container's termination message."""
SUMMARY_VERSION = 1
TERMINATION_LOG = Path("/dev/termination-log")

ERROR_MAX_CHARS = 1024
ALERT_REASON_MAX_CHARS = 256
NAME_MAX_CHARS = 200
OUTPUT_PREVIEW_MAX_CHARS = MESSAGE_LIMIT_BYTES
_MIN_LIMIT_BYTES = 256  # the fields never cut (status, numbers, flags) take at most ~215
_PARSE_MAX_BYTES = 64 * 1024  # far beyond any summary: anything larger is not one
_ELLIPSIS = "…"
_MAX_INT = 2**63 - 1

# Shrunk in this order until the message fits; the last ones are tiny and rarely touched.
_SHRINKABLE = ("output_preview", "error", "alert_reason", "model", "provider")


class Summary(BaseModel):
    """A run's outcome, serialised with camelCase keys (``costUSD`` is a decimal string)."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",  # a newer runner may add fields; an older operator still reads it
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    version: Literal[1] = 1
    execution_id: int | None = Field(None, alias="executionId", ge=1, le=_MAX_INT)
    # RUNNING only in a summary written at start, which the final one overwrites: seeing it
    # means the runner was killed before it could finish.
    status: RunOutcome
    # strict: the runner passes a Decimal (never a float); JSON carries a decimal string.
    cost_usd: Decimal = Field(Decimal(0), alias="costUSD", ge=0, le=MAX_USD, strict=True)
    input_tokens: int = Field(0, alias="inputTokens", ge=0, le=_MAX_INT)
    output_tokens: int = Field(0, alias="outputTokens", ge=0, le=_MAX_INT)
    model: str | None = None
    provider: str | None = None
    attempt: int | None = Field(None, ge=0, le=_MAX_INT)
    started_at: AwareDatetime | None = Field(None, alias="startedAt")
    completed_at: AwareDatetime | None = Field(None, alias="completedAt")
    alert: bool = False
    alert_reason: str | None = Field(None, alias="alertReason")
    error: str | None = None
    output_preview: str | None = Field(None, alias="outputPreview")
    history_written: bool = Field(False, alias="historyWritten")

    @field_validator("cost_usd")
    @classmethod
    def _round_up_to_micro_usd(cls, value: Decimal) -> Decimal:
        # The history table's rule: never under-report, never cross a 6-decimal budget.
        return quantize_usd(value)

    @field_validator("started_at", "completed_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        try:
            return None if value is None else value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00+01:00 is a valid time before year 1 in UTC
            raise ValueError("out of range in UTC") from None

    @field_validator("model", "provider", "alert_reason", "error", "output_preview", mode="before")
    @classmethod
    def _storable_text(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        limit = {
            "error": ERROR_MAX_CHARS,
            "alert_reason": ALERT_REASON_MAX_CHARS,
            "output_preview": OUTPUT_PREVIEW_MAX_CHARS,
        }.get(info.field_name or "", NAME_MAX_CHARS)
        # Lone surrogates (from undecodable bytes) cannot be encoded as UTF-8 JSON.
        text = value.encode("utf-8", "replace").decode("utf-8")
        return text if len(text) <= limit else text[: limit - 1] + _ELLIPSIS

    @field_serializer("cost_usd")
    def _decimal_string(self, value: Decimal) -> str:
        text = format(value.normalize(), "f")
        return text if text != "-0" else "0"

    def to_json(self) -> str:
        """Compact JSON with every field, however long (see ``to_message`` for the bounded one)."""
        return self.model_dump_json(exclude_none=True)

    def to_message(self, limit: int = MESSAGE_LIMIT_BYTES) -> str:
        """Compact JSON of at most ``limit`` UTF-8 bytes: long text fields are cut (marked with
        "…") or dropped, the numbers and status are always kept (they need < 256 bytes)."""
        if limit < _MIN_LIMIT_BYTES:
            raise ValueError(f"limit: {limit} bytes cannot hold a summary; minimum is 256")
        summary = self
        text = summary.to_json()
        for name in _SHRINKABLE:
            while _size(text) > limit and getattr(summary, name) is not None:
                value: str = getattr(summary, name)
                shorter = _shrink(value, _escaped_size(value) - (_size(text) - limit))
                summary = summary.model_copy(update={name: shorter})
                text = summary.to_json()
            if _size(text) <= limit:
                return text
        # Only a limit far below 4096 gets here: keep the numbers, status and execution id.
        optional = ("attempt", "started_at", "completed_at", *_SHRINKABLE)
        return summary.model_copy(update=dict.fromkeys(optional)).to_json()


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _escaped_size(value: str) -> int:
    """Bytes of the JSON string literal without its quotes."""
    return _size(json.dumps(value, ensure_ascii=False)) - 2


def _shrink(value: str, budget: int) -> str | None:
    """The longest prefix of ``value`` plus "…" whose JSON escape takes at most ``budget`` bytes
    and is shorter than ``value``; None when not even the marker fits."""
    if budget < _escaped_size(_ELLIPSIS):
        return None
    low, high = 0, len(value) - 1  # always remove at least one character
    while low < high:
        middle = (low + high + 1) // 2
        if _escaped_size(value[:middle] + _ELLIPSIS) <= budget:
            low = middle
        else:
            high = middle - 1
    return value[:low] + _ELLIPSIS


def parse_summary(text: str | bytes | None) -> Summary | None:
    """The summary in a termination message, or None for anything else (empty, log lines,
    truncated or foreign JSON, another version). Never raises."""
    try:
        if text is None:
            return None
        if isinstance(text, bytes):
            if len(text) > _PARSE_MAX_BYTES:
                return None
            text = text.decode("utf-8", "replace")
        text = text.strip()
        if not text.startswith("{") or len(text) > _PARSE_MAX_BYTES:
            return None
        return Summary.model_validate_json(text)
    except Exception:  # the contract is "never raises"
        return None


def write_termination_message(summary: Summary, path: Path = TERMINATION_LOG) -> bool:
    """Write the bounded summary to ``path``; False (and a warning) if it cannot be written."""
    try:
        path.write_text(summary.to_message(), encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the run summary to %s: %s", path, exc)
        return False
    return True
