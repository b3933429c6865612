"""The next fire times are reused until the first of them has passed (issue 13: computing them
was a quarter of the operator's idle work at 1,000 schedules): what is reused is what robfig's
Next chain yields from that moment, in DST-heavy zones too."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from nocturne_operator.schedule import cron

SCHEDULES = (
    "30 2 * * *",
    "0 1 * * *",
    "15 1,2,3 * * *",
    "30 1 * * *",
    "*/7 * * * *",
    "0 0 1 * *",
    "59 23 * * 0",
    "0 2 29 2 *",
    "0 */6 * * *",
    "1 0 * * *",
)
ZONES = (
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "America/St_Johns",
    "Pacific/Chatham",
    "America/Santiago",
    "Europe/Dublin",
    "Africa/Casablanca",
    "Asia/Tokyo",
)


def fresh(expr: str, zone: str, after: datetime, count: int) -> list[datetime]:
    cron._NEXT_FIRES.clear()
    return cron.next_fire_times(cron.parse_schedule(expr), ZoneInfo(zone), after, count)


@settings(max_examples=1500, derandomize=True, database=None, deadline=None)
@given(
    st.sampled_from(SCHEDULES),
    st.sampled_from(ZONES),
    # hypothesis takes naive bounds; each drawn moment is made UTC below.
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2036, 1, 1)),  # noqa: DTZ001
    st.floats(0, 1),
    st.integers(1, 5),
)
def test_reused_times_are_the_times_from_that_moment(
    expr: str, zone: str, naive: datetime, fraction: float, count: int
) -> None:
    a = naive.replace(tzinfo=UTC)
    first = fresh(expr, zone, a, count)  # kept, from a
    if not first:
        return
    b = a + (first[0] - a) * fraction  # any moment before the first of them
    if b >= first[0]:
        return
    reused = cron.next_fire_times(cron.parse_schedule(expr), ZoneInfo(zone), b, count)
    assert cron._NEXT_FIRES, "the chain from a was kept"
    assert reused == fresh(expr, zone, b, count)


def test_a_moment_at_or_after_the_first_time_computes_anew() -> None:
    schedule, zone = cron.parse_schedule("0 9 * * *"), ZoneInfo("Asia/Tokyo")
    cron._NEXT_FIRES.clear()
    start = datetime(2026, 12, 2, 0, 0, tzinfo=UTC)  # 09:00 in Tokyo
    [first, second] = cron.next_fire_times(schedule, zone, start, 2)
    assert first == datetime(2026, 12, 3, 9, 0, tzinfo=zone)
    assert cron.next_fire_times(schedule, zone, first, 2)[0] == second
    assert cron.next_fire_times(schedule, zone, start, 2) == [first, second]  # earlier: anew
