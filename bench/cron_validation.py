"""How long schedule validation takes: min_interval / check_min_interval over one year.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/cron_validation.py

The baseline, measured in the same run, is croniter walking the same year of fire times and
taking the smallest gap (what a naive validator would do). Figures only, no assertions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

from croniter import croniter

from nocturne_operator.schedule.cron import check_min_interval, min_interval, parse_schedule

ZONE = "America/New_York"
YEAR = 2026
REPEAT = 5

MINIMUM = timedelta(minutes=15)  # for check_min_interval
CASES = [  # (label, expression, also time the croniter baseline)
    ("hourly", "0 * * * *", True),
    ("every 5 min, rejected early", "*/5 * * * *", True),
    ("@daily", "@daily", True),
    ("complex list", "7,19,23,41 */3 1-20 * 1-5", True),
    ("every minute (short-circuits)", "* * * * *", False),  # croniter needs ~25 s here
]


def best_of(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    """Fastest of ``repeat`` runs, in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def croniter_min_gap(expr: str, tz: ZoneInfo, year_start: datetime) -> timedelta:
    """The naive way: iterate every fire time of the year and keep the smallest gap."""
    year_end = year_start.replace(year=year_start.year + 1)
    it = croniter(expr, year_start - timedelta(seconds=1))
    previous: datetime = it.get_next(datetime)
    best = timedelta.max
    while previous < year_end:
        current: datetime = it.get_next(datetime)
        best = min(best, current - previous)
        previous = current
    return best


def main() -> None:
    year_start = datetime(YEAR, 1, 1, tzinfo=ZoneInfo(ZONE))
    print(f"zone {ZONE}, year {YEAR}; best of {REPEAT} runs, milliseconds; check at {MINIMUM}")
    header = (
        f"{'schedule':30} {'min_interval':>12} {'cold':>8} {'check':>8} "
        f"{'croniter':>10} {'ratio':>8}  result"
    )
    print(header)
    print("-" * len(header))
    for label, expr, with_baseline in CASES:
        schedule = parse_schedule(expr)
        # A zone object of its own makes the first call pay for the zone's offset tables.
        cold_tz = ZoneInfo.no_cache(ZONE)
        start = time.perf_counter()
        min_interval(schedule, cold_tz, year_start)
        cold = (time.perf_counter() - start) * 1000
        tz = ZoneInfo(ZONE)
        ours = best_of(partial(min_interval, schedule, tz, year_start))
        check = best_of(partial(check_min_interval, schedule, tz, MINIMUM, year_start))
        compared = f"{'-':>10} {'-':>8}"
        if with_baseline:
            baseline = best_of(partial(croniter_min_gap, expr, tz, year_start), repeat=1)
            compared = f"{baseline:10.1f} {baseline / ours:7.0f}x"
        result = min_interval(schedule, tz, year_start)
        print(f"{label:30} {ours:12.2f} {cold:8.2f} {check:8.2f} {compared}  {result}")


if __name__ == "__main__":
    main()
