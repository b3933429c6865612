"""Measure what the sweep pays to validate a schedule: a year's fire-time and DST scan each pass
(the baseline: the cache cleared before every call) against the same validate() within the hour,
when the scan is reused (issue 13: the sweep validates every schedule every minute).

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/validation_cache.py
Prints, per schedule, the best of 5 runs in milliseconds per validate() and the ratio.
"""

from __future__ import annotations

import timeit
from datetime import UTC, datetime
from typing import Any

from nocturne_operator.prices import load_price_table
from nocturne_operator.schedule.validation import _timing, validate
from nocturne_operator.settings import Settings

SCHEDULES = [
    ("0 9 * * *", "Asia/Tokyo"),
    ("30 2 * * *", "America/New_York"),  # meets both DST changes: notes on status
    ("0 */6 * * *", "Europe/Berlin"),
    ("15 4 * * 1-5", "Australia/Lord_Howe"),  # a 30-minute DST change
]
NOW = datetime(2026, 12, 2, 15, 10, tzinfo=UTC)


def body(expr: str, zone: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "digest", "namespace": "research"},
        "spec": {
            "schedule": expr,
            "timeZone": zone,
            "task": {"query": "digest"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "1.00"},
        },
    }


def main() -> None:
    settings, prices = Settings(), load_price_table(None)
    print("best of 5 runs, milliseconds per validate()")
    print(
        f"{'schedule':16} {'zone':20} {'scan each time':>14} {'within the hour':>16} {'ratio':>7}"
    )
    for expr, zone in SCHEDULES:
        doc = body(expr, zone)

        def cold(doc: dict[str, Any] = doc) -> None:
            _timing.cache_clear()
            validate(doc, settings, now=NOW, prices=prices)

        def warm(doc: dict[str, Any] = doc) -> None:
            validate(doc, settings, now=NOW, prices=prices)

        warm()
        scan = min(timeit.repeat(cold, number=20, repeat=5)) / 20 * 1000
        cached = min(timeit.repeat(warm, number=200, repeat=5)) / 200 * 1000
        print(f"{expr!r:16} {zone:20} {scan:14.2f} {cached:16.3f} {scan / cached:6.0f}x")


if __name__ == "__main__":
    main()
