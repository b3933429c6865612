"""Kubernetes timestamps (RFC 3339, UTC, whole seconds) to and from aware datetimes."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """``2026-11-26T09:00:00Z``: how the API server writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(stamp: str) -> datetime:
    """An aware datetime from an API server time (``Z`` or an offset)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
