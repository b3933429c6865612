"""Bounded retries: exponential backoff with jitter, honouring ``Retry-After``. Pure functions."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

# Statuses worth another attempt. Some may come after the provider generated (and billed) an
# answer: see ``may_have_been_processed``.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# A gateway's 502/504 (the provider dropped the connection or was too slow for the proxy), a 500
# from a failure after generation, a proxy's 503 "upstream reset before headers": the generation
# may have completed and been billed.
_MAYBE_PROCESSED_STATUSES = frozenset({500, 502, 503, 504})


def may_have_been_processed(status: int, retry_after: float | None) -> bool:
    """Whether an error answer may follow a completed (billed) generation. 408, 409, 429, 529
    and a 503 with ``Retry-After`` (load shedding) are refusals before any processing."""
    if status == 503 and retry_after is not None:
        return False
    return status in _MAYBE_PROCESSED_STATUSES


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one model call. The run's deadline bounds it too."""

    max_attempts: int = 5
    base_delay: float = 1.0  # seconds before the first retry (before jitter)
    max_delay: float = 30.0  # cap of the exponential backoff
    max_retry_after: float = 300.0  # a server asking for a longer wait is not waited for


def parse_retry_after(
    headers: Mapping[str, str], *, now: dt.datetime | None = None
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or HTTP date);
    None when absent or unparseable. Dates in the past give 0."""
    lowered = {key.lower(): value for key, value in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)`` capped at
    ``max_delay``, with "equal jitter" (uniform in the upper half) so clients spread out."""
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def retry_delay(
    attempt: int, policy: RetryPolicy, rng: random.Random, retry_after: float | None
) -> float | None:
    """Delay before retry ``attempt``: at least the server's ``Retry-After``; None when the
    server asks for more than ``max_retry_after``."""
    delay = backoff_delay(attempt, policy, rng)
    if retry_after is not None:
        if retry_after > policy.max_retry_after:
            return None
        delay = max(delay, retry_after)
    return delay
