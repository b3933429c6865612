"""What the history accepts: the checks every write and read applies to its arguments before SQL
sees them -- money as ``Decimal`` quantized by the runner contract's one rule, token counts, aware
times, page sizes -- and text cut to what PostgreSQL can store. A leaf like ``schema``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation

from agent_runner.contract import MAX_TOKENS, MAX_USD, quantize_usd

__all__ = ["ERROR_LIMIT_BYTES", "OUTPUT_LIMIT_BYTES", "clean_text"]

OUTPUT_LIMIT_BYTES = 1024 * 1024
"""A run's output is truncated beyond this (UTF-8 bytes): losing the record would be worse."""
ERROR_LIMIT_BYTES = 64 * 1024
"""A run's error text is truncated beyond this (UTF-8 bytes)."""

MAX_PAGE = 1000
"""The most rows one list read returns."""


def usd(name: str, value: Decimal) -> Decimal:
    """``value`` quantized to the stored precision; ``name`` is the argument in messages."""
    if not isinstance(value, Decimal):
        raise TypeError(f"{name}: {value!r} must be a Decimal (money is never a float)")
    if not value.is_finite() or value < 0:
        raise ValueError(f"{name}: {value} must be a finite amount >= 0")
    try:
        quantized = quantize_usd(value)
    except InvalidOperation:
        quantized = MAX_USD + 1
    if quantized > MAX_USD:
        raise ValueError(f"{name}: {value} exceeds the largest storable amount {MAX_USD}")
    return quantized


def tokens(name: str, value: int) -> int:
    """``value`` if it is a storable token count."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{name}: {value!r} must be an integer between 0 and {MAX_TOKENS}")
    return value


def aware(name: str, value: datetime) -> datetime:
    """``value`` if it is a timezone-aware datetime (columns are ``timestamptz``)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: {value!r} must be a timezone-aware datetime")
    return value


def check_page_limit(limit: int) -> None:
    """Refuse a page size outside 1..MAX_PAGE."""
    if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit: {limit!r} must be between 1 and {MAX_PAGE}")


def clean_text(value: str | None, limit_bytes: int) -> str | None:
    """Text PostgreSQL can store: NUL replaced, invalid surrogates replaced, long text cut at a
    character boundary with a visible marker."""
    if value is None:
        return None
    data = value.replace("\x00", "\ufffd").encode("utf-8", "replace")
    if len(data) <= limit_bytes:
        return data.decode("utf-8")
    marker = f"\n…[truncated, {len(data)} bytes in total]"
    keep = limit_bytes - len(marker.encode("utf-8"))
    return data[:keep].decode("utf-8", "ignore") + marker
