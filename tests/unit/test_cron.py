"""CronJob schedule semantics (nocturne_operator.schedule.cron) pinned against robfig/cron v3.

Every expected fire time below was produced by robfig/cron v3.0.1 itself, called the way the
CronJob controller calls it: ``ParseStandard("TZ=<zone> <schedule>")`` and chained ``Next``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from nocturne_operator.schedule import fires, zones
from nocturne_operator.schedule.cron import (
    CronError,
    DstAnomaly,
    RunTime,
    check_min_interval,
    describe_run,
    dst_anomalies,
    min_interval,
    next_fire_times,
    parse_schedule,
)

NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"


def _at(zone: str, text: str) -> datetime:
    """An aware datetime: ``text`` is local wall time in ``zone`` unless it carries an offset."""
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=ZoneInfo(zone))


def _fires(expr: str, zone: str, after: str, count: int) -> list[str]:
    times = next_fire_times(parse_schedule(expr), ZoneInfo(zone), _at(zone, after), count)
    return [t.isoformat() for t in times]


def _year(zone: str, year: int = 2026) -> datetime:
    return datetime(year, 1, 1, tzinfo=ZoneInfo(zone))


# --- fire times, as robfig computes them ----------------------------------------------------------

FIRE_TIMES = [
    pytest.param("@yearly", "UTC", "2026-06-01T00:00", ["2027-01-01T00:00:00+00:00"], id="yearly"),
    pytest.param(
        "@annually", "UTC", "2026-06-01T00:00", ["2027-01-01T00:00:00+00:00"], id="annually"
    ),
    pytest.param(
        "@monthly",
        "UTC",
        "2026-06-01T00:00",
        ["2026-07-01T00:00:00+00:00", "2026-08-01T00:00:00+00:00"],
        id="monthly",
    ),
    pytest.param(
        "@weekly",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-07T00:00:00+00:00", "2026-06-14T00:00:00+00:00"],
        id="weekly-on-sunday",
    ),
    pytest.param(
        "@daily",
        "Asia/Tokyo",
        "2026-06-01T09:00",
        ["2026-06-02T00:00:00+09:00", "2026-06-03T00:00:00+09:00"],
        id="daily-in-zone",
    ),
    pytest.param(
        "@midnight",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00"],
        id="midnight",
    ),
    pytest.param(
        "@hourly",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-01T01:00:00+00:00", "2026-06-01T02:00:00+00:00"],
        id="hourly",
    ),
    pytest.param(
        "@every 90m",
        "UTC",
        "2026-06-01T00:00:07.500",
        ["2026-06-01T01:30:07+00:00", "2026-06-01T03:00:07+00:00", "2026-06-01T04:30:07+00:00"],
        id="every-drops-subseconds",
    ),
    pytest.param(
        "@every 1500ms",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-01T00:00:01+00:00", "2026-06-01T00:00:02+00:00"],
        id="every-truncates-to-seconds",
    ),
    pytest.param(
        "0 9 * JAN-MAR mon-FRI",
        "UTC",
        "2026-03-27T00:00",
        [
            "2026-03-27T09:00:00+00:00",
            "2026-03-30T09:00:00+00:00",
            "2026-03-31T09:00:00+00:00",
            "2027-01-01T09:00:00+00:00",
        ],
        id="names-case-insensitive",
    ),
    pytest.param(
        "5/15 * * * *",
        "UTC",
        "2026-06-01T00:00",
        [
            "2026-06-01T00:05:00+00:00",
            "2026-06-01T00:20:00+00:00",
            "2026-06-01T00:35:00+00:00",
            "2026-06-01T00:50:00+00:00",
            "2026-06-01T01:05:00+00:00",
        ],
        id="n-slash-step-means-n-to-max",
    ),
    pytest.param(
        "0 0 ? * MON",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-08T00:00:00+00:00", "2026-06-15T00:00:00+00:00"],
        id="question-mark-is-star",
    ),
    pytest.param(
        "0 0 1 * MON",
        "UTC",
        "2026-06-01T00:00",
        [
            "2026-06-08T00:00:00+00:00",
            "2026-06-15T00:00:00+00:00",
            "2026-06-22T00:00:00+00:00",
            "2026-06-29T00:00:00+00:00",
            "2026-07-01T00:00:00+00:00",
        ],
        id="dom-or-dow-when-neither-is-star",
    ),
    pytest.param(
        "0 0 */2 * MON",
        "UTC",
        "2026-06-01T00:00",
        [
            "2026-06-03T00:00:00+00:00",
            "2026-06-05T00:00:00+00:00",
            "2026-06-07T00:00:00+00:00",
            "2026-06-08T00:00:00+00:00",
            "2026-06-09T00:00:00+00:00",
        ],
        id="step-2-is-not-a-star-so-or",
    ),
    pytest.param(
        "0 0 */1 * MON",
        "UTC",
        "2026-06-01T00:00",
        ["2026-06-08T00:00:00+00:00", "2026-06-15T00:00:00+00:00"],
        id="step-1-keeps-the-star-so-and",
    ),
    pytest.param(
        "0 0 * * */2",
        "UTC",
        "2026-06-01T00:00",
        [
            "2026-06-02T00:00:00+00:00",
            "2026-06-04T00:00:00+00:00",
            "2026-06-06T00:00:00+00:00",
            "2026-06-07T00:00:00+00:00",
        ],
        id="dom-star-so-dow-decides",
    ),
    pytest.param(
        "0 0 29 2 *",
        "UTC",
        "2026-01-01T00:00",
        ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"],
        id="leap-day",
    ),
    pytest.param(
        "30 2 * * *",
        NEW_YORK,
        "2026-03-07T00:00",
        ["2026-03-07T02:30:00-05:00", "2026-03-09T02:30:00-04:00"],
        id="new-york-spring-gap-never-runs",
    ),
    pytest.param(
        "30 1 * * *",
        NEW_YORK,
        "2026-10-31T00:00",
        [
            "2026-10-31T01:30:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-02T01:30:00-05:00",
        ],
        id="new-york-fall-back-runs-twice",
    ),
    pytest.param(
        "0 */6 * * *",
        NEW_YORK,
        "2026-03-07T20:00",
        ["2026-03-08T00:00:00-05:00", "2026-03-08T06:00:00-04:00"],
        id="new-york-six-hours-are-five",
    ),
    pytest.param(
        "30 1 * * *",
        "Europe/London",
        "2026-03-28T00:00",
        ["2026-03-28T01:30:00+00:00", "2026-03-30T01:30:00+01:00"],
        id="london-spring-gap",
    ),
    pytest.param(
        "30 1 * * *",
        "Europe/London",
        "2026-10-24T12:00",
        ["2026-10-25T01:30:00+01:00", "2026-10-25T01:30:00+00:00", "2026-10-26T01:30:00+00:00"],
        id="london-fall-back",
    ),
    pytest.param(
        "15 2 * * *",
        LORD_HOWE,
        "2026-10-03T00:00",
        ["2026-10-03T02:15:00+10:30", "2026-10-05T02:15:00+11:00"],
        id="lord-howe-skipped-half-hour",
    ),
    pytest.param(
        "45 2 * * *",
        LORD_HOWE,
        "2026-10-03T00:00",
        ["2026-10-03T02:45:00+10:30", "2026-10-04T02:45:00+11:00"],
        id="lord-howe-after-the-gap-runs",
    ),
    pytest.param(
        "45 1 * * *",
        LORD_HOWE,
        "2026-04-04T00:00",
        [
            "2026-04-04T01:45:00+11:00",
            "2026-04-05T01:45:00+11:00",
            "2026-04-05T01:45:00+10:30",
            "2026-04-06T01:45:00+10:30",
        ],
        id="lord-howe-repeated-half-hour",
    ),
    pytest.param(
        "0 0 * * *",
        LORD_HOWE,
        "2026-04-04T12:00",
        ["2026-04-05T00:00:00+11:00", "2026-04-07T00:00:00+10:30"],
        id="lord-howe-carried-half-hour-skips-monday",
    ),
    pytest.param(
        "15 2 * * *",
        LORD_HOWE,
        "2026-04-04T00:00",
        ["2026-04-04T02:15:00+11:00", "2026-04-06T02:15:00+10:30"],
        id="lord-howe-fall-back-overshoots",
    ),
    pytest.param(
        "0 12 * * 0",
        "America/Santiago",
        "2026-08-30T13:00",
        ["2026-09-06T12:00:00-03:00", "2026-09-13T12:00:00-03:00"],
        id="santiago-midnight-correction",
    ),
    pytest.param(
        "0 0 * * 0",
        "America/Santiago",
        "2026-08-30T13:00",
        ["2026-09-13T00:00:00-03:00"],
        id="santiago-missing-midnight",
    ),
    pytest.param(
        "44 6/8 3/5 * *",
        "Asia/Beirut",
        "2020-03-28T22:00",
        ["2020-03-28T22:44:00+02:00", "2020-03-29T06:44:00+03:00", "2020-04-03T06:44:00+03:00"],
        id="beirut-fires-on-an-unnamed-day",
    ),
    pytest.param(
        "52 3 * * *",
        "Pacific/Chatham",
        "2026-04-03T12:00",
        ["2026-04-04T03:52:00+13:45"],
        id="chatham-next-stops-advancing",
    ),
]


@pytest.mark.parametrize(("expr", "zone", "after", "expected"), FIRE_TIMES)
def test_fire_times_match_robfig(expr: str, zone: str, after: str, expected: list[str]) -> None:
    assert _fires(expr, zone, after, len(expected)) == expected


def test_exhausted_chain_returns_fewer_times() -> None:
    # robfig gives up after five years: no 29 February between 2097 and 2102 (2100 is no leap year)
    assert _fires("0 0 29 2 *", "UTC", "2097-01-01T00:00", 3) == []
    assert _fires("0 0 29 2 *", "UTC", "2096-01-01T00:00", 3) == ["2096-02-29T00:00:00+00:00"]
    # Next(t) == t: the controller errors out and never runs 02:52 or anything later
    assert _fires("52 3 * * *", "Pacific/Chatham", "2026-04-03T12:00", 5) == [
        "2026-04-04T03:52:00+13:45"
    ]


@pytest.mark.parametrize(
    ("expr", "zone"),
    [
        ("30 1,3 * * *", NEW_YORK),
        ("*/7 0-3 * * *", NEW_YORK),
        ("0 0 * * *", LORD_HOWE),
        ("10,40 1-3 * * 0,1", LORD_HOWE),
        ("0 0,12 * * 0", "America/Santiago"),
        ("44 6/8 3/5 * *", "Asia/Beirut"),
        ("0 9 1-7 * MON", "Europe/London"),
    ],
)
def test_fast_path_equals_plain_next_chain(expr: str, zone: str) -> None:
    """The calm-stretch shortcut must give exactly the chain of robfig Next calls."""
    schedule, tz = parse_schedule(expr), ZoneInfo(zone)
    start = _year(zone, 2020 if zone == "Asia/Beirut" else 2026)
    fast = [int(t.timestamp()) for t in next_fire_times(schedule, tz, start, 800)]
    chain, t = [], int(start.timestamp())
    zone_model = zones.cached_zone(tz)
    for _ in range(800):
        following = fires.spec_next(schedule, zone_model, t)
        assert following is not None
        chain.append(t := following)
    assert fast == chain


UTC_SCHEDULES = [
    "* * * * *",
    "*/7 * * * *",
    "5/15 3-5 * * *",
    "0 */6 * * *",
    "15,45 9-17 * * *",
    "0 9 * * 1-5",
    "30 8 * * SAT,SUN",
    "0 0 1 * *",
    "0 12 15 */2 *",
    "0 0 10-20/5 * *",
    "@daily",
    "@weekly",
    "@monthly",
    "0 0 29 2 *",
    "59 23 31 12 *",
]


@pytest.mark.parametrize("expr", UTC_SCHEDULES)
def test_agrees_with_croniter_on_plain_utc_schedules(expr: str) -> None:
    # 15 runs keep "0 0 29 2 *" before 2100, where robfig's five-year search gives up.
    start = datetime(2026, 2, 27, 13, 17, 41, tzinfo=UTC)
    ours = [
        t.astimezone(UTC) for t in next_fire_times(parse_schedule(expr), ZoneInfo("UTC"), start, 15)
    ]
    theirs = croniter(expr, start)
    assert ours == [theirs.get_next(datetime) for _ in range(15)]


# --- parsing --------------------------------------------------------------------------------------


def test_descriptors_are_their_five_field_equivalents() -> None:
    equivalents = {
        "@yearly": "0 0 1 1 *",
        "@annually": "0 0 1 1 *",
        "@monthly": "0 0 1 * *",
        "@weekly": "0 0 * * 0",
        "@daily": "0 0 * * *",
        "@midnight": "0 0 * * *",
        "@hourly": "0 * * * *",
    }
    for descriptor, spec in equivalents.items():
        a, b = parse_schedule(descriptor), parse_schedule(spec)
        assert (a.minute, a.hour, a.dom, a.month, a.dow, a.dom_star, a.dow_star) == (
            b.minute,
            b.hour,
            b.dom,
            b.month,
            b.dow,
            b.dom_star,
            b.dow_star,
        ), descriptor


@pytest.mark.parametrize(
    ("expr", "dom_star", "dow_star"),
    [
        ("0 0 * * *", True, True),
        ("0 0 ? * MON", True, False),
        ("0 0 */1 * MON", True, False),
        ("0 0 */2 * MON", False, False),
        ("0 0 1-31 * MON", False, False),
        ("0 0 1,* * MON", True, False),
        ("0 0 1 * ?", False, True),
    ],
)
def test_star_bit(expr: str, dom_star: bool, dow_star: bool) -> None:
    schedule = parse_schedule(expr)
    assert (schedule.dom_star, schedule.dow_star) == (dom_star, dow_star)


@pytest.mark.parametrize(
    ("expr", "every"),
    [
        ("@every 90m", timedelta(minutes=90)),
        ("@every 1h30m10s", timedelta(hours=1, minutes=30, seconds=10)),
        ("@every 1.5h", timedelta(minutes=90)),
        ("@every 1500ms", timedelta(seconds=1)),
        ("@every 0", timedelta(seconds=1)),
        ("@every -5m", timedelta(seconds=1)),
        ("@every 2562047h", timedelta(hours=2562047)),
    ],
)
def test_every_is_rounded_like_robfig(expr: str, every: timedelta) -> None:
    assert parse_schedule(expr).every == every


@pytest.mark.parametrize(
    "expr",
    [
        "+5 * * * *",  # strconv.Atoi takes a sign
        "007 * * * *",
        "*-5 3 * * *",  # robfig ignores what follows "*-"
        "1,,2 * * * *",  # empty list elements are dropped
        "0\t0\n* *\u00a0*",  # Go's unicode.IsSpace
        "0 0 * * FR\u0130",  # Go lower-cases U+0130 to a plain "i"
        "0 0 30 2 MON",  # OR rule: the Mondays of February
        "0 0 ? * ?",
    ],
)
def test_accepts_what_robfig_accepts(expr: str) -> None:
    parse_schedule(expr)


REJECTED = [
    ("", "schedule is empty"),
    ("   ", "expected 5 fields (minute hour day-of-month month day-of-week), found 0"),
    ("0 0", "expected 5 fields (minute hour day-of-month month day-of-week), found 2"),
    (
        "0 0 * * * *",
        "expected 5 fields (minute hour day-of-month month day-of-week), found 6; "
        "a seconds field is not supported",
    ),
    ("TZ=UTC 0 0 * * *", "cannot use TZ or CRON_TZ in schedule, use spec.timeZone instead"),
    (
        "CRON_TZ=Europe/Berlin 0 0 * * *",
        "cannot use TZ or CRON_TZ in schedule, use spec.timeZone instead",
    ),
    ("61 * * * *", 'minute field "61": value 61 out of range 0-59'),
    ("1,61 * * * *", 'minute field "1,61": value 61 out of range 0-59'),
    ("* 24 * * *", 'hour field "24": value 24 out of range 0-23'),
    ("* * 0 * *", 'day-of-month field "0": value 0 out of range 1-31'),
    ("* * 32 * *", 'day-of-month field "32": value 32 out of range 1-31'),
    ("* * * 0 *", 'month field "0": value 0 out of range 1-12'),
    ("* * * 13 *", 'month field "13": value 13 out of range 1-12'),
    (
        "* * * * 7",
        'day-of-week field "7": value 7 out of range 0-6 (use 0 or SUN for Sunday)',
    ),
    (
        "* * * * 0-7",
        'day-of-week field "0-7": value 7 out of range 0-6 (use 0 or SUN for Sunday)',
    ),
    ("1-2-3 * * * *", 'minute field "1-2-3": too many "-" in "1-2-3"'),
    ("*/2/3 * * * *", 'minute field "*/2/3": too many "/" in "*/2/3"'),
    ("*/0 * * * *", 'minute field "*/0": step "0" must be a positive number'),
    ("*/-5 * * * *", 'minute field "*/-5": step "-5" must be a positive number'),
    ("-5 * * * *", 'minute field "-5": missing range start'),
    ("5- * * * *", 'minute field "5-": missing range end'),
    ("/5 * * * *", 'minute field "/5": missing value'),
    ("*/ * * * *", 'minute field "*/": missing step'),
    ("20-10 * * * *", 'minute field "20-10": range start 20 is after range end 10'),
    ("x * * * *", 'minute field "x": "x" is not a number'),
    ("1.5 * * * *", 'minute field "1.5": "1.5" is not a number'),
    ("MON * * * *", 'minute field "MON": "MON" is not a number'),
    ("* * L * *", 'day-of-month field "L": "L" is not a number'),
    ("* * * foo *", 'month field "foo": "foo" is not a number or a month name (JAN-DEC)'),
    (
        "* * * JAN-FOO *",
        'month field "JAN-FOO": "FOO" is not a number or a month name (JAN-DEC)',
    ),
    (
        "* * * * MONDAY",
        'day-of-week field "MONDAY": "MONDAY" is not a number or a day name (SUN-SAT)',
    ),
    ("* * * * 1#2", 'day-of-week field "1#2": "1#2" is not a number or a day name (SUN-SAT)'),
    (
        "99999999999999999999 * * * *",
        'minute field "99999999999999999999": value 99999999999999999999 is too large',
    ),
    (
        "@daily ",
        'unknown descriptor "@daily " (expected @yearly, @annually, @monthly, @weekly, @daily, '
        "@midnight, @hourly or @every <duration>)",
    ),
    (
        "@reboot",
        'unknown descriptor "@reboot" (expected @yearly, @annually, @monthly, @weekly, @daily, '
        "@midnight, @hourly or @every <duration>)",
    ),
    ("@every ", '@every duration "": invalid duration'),
    ("@every 5", '@every duration "5": missing unit'),
    ("@every 5x", '@every duration "5x": unknown unit "x"'),
    ("@every 1h ", '@every duration "1h ": unknown unit "h "'),
    ("@every 2562048h", '@every duration "2562048h": invalid duration'),
    (
        "0 0 30 2 *",
        'never fires: no date matches day-of-month "30", month "2" and day-of-week "*"',
    ),
    (
        "0 0 31 4,6,9,11 *",
        'never fires: no date matches day-of-month "31", month "4,6,9,11" and day-of-week "*"',
    ),
    (", * * * *", 'never fires: minute field "," matches no value'),
]


@pytest.mark.parametrize(("expr", "message"), REJECTED)
def test_rejects_with_a_concrete_message(expr: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse_schedule(expr)
    assert str(caught.value) == message


def test_cron_error_is_a_value_error() -> None:
    assert issubclass(CronError, ValueError)


# --- minimum interval -----------------------------------------------------------------------------

MIN_INTERVALS = [
    ("0,5 9 * * *", NEW_YORK, timedelta(minutes=5)),
    ("0 */6 * * *", "UTC", timedelta(hours=6)),
    ("0 */6 * * *", NEW_YORK, timedelta(hours=5)),  # 00:00 EST -> 06:00 EDT
    ("30 1,3 * * *", "UTC", timedelta(hours=2)),
    ("30 1,3 * * *", NEW_YORK, timedelta(hours=1)),  # 01:30 EST -> 03:30 EDT
    ("30 1,3 * * *", LORD_HOWE, timedelta(minutes=30)),  # 01:30 +11 -> 01:30 +10:30
    ("0,50 1 * * *", NEW_YORK, timedelta(minutes=10)),  # 01:50 EDT -> 01:00 EST
    ("@daily", NEW_YORK, timedelta(hours=23)),
    ("@daily", "UTC", timedelta(days=1)),
    ("0 0 1 * *", "UTC", timedelta(days=28)),
    ("0 0 29 2 *", "UTC", timedelta(days=1461)),  # no 29 Feb in 2026: 2028 -> 2032
    ("* * * * *", NEW_YORK, timedelta(minutes=1)),
    ("0 * * * *", LORD_HOWE, timedelta(hours=1)),
    ("0 0 * * *", LORD_HOWE, timedelta(days=1)),
    ("@every 90m", NEW_YORK, timedelta(minutes=90)),
]


@pytest.mark.parametrize(("expr", "zone", "expected"), MIN_INTERVALS)
def test_min_interval(expr: str, zone: str, expected: timedelta) -> None:
    assert min_interval(parse_schedule(expr), ZoneInfo(zone), _year(zone)) == expected


@pytest.mark.parametrize("hour", [0, 9, 10, 23])
def test_min_interval_does_not_depend_on_the_time_of_day(hour: int) -> None:
    start = _year(NEW_YORK).replace(hour=hour, minute=3)
    assert min_interval(parse_schedule("0,5 9 * * *"), ZoneInfo(NEW_YORK), start) == timedelta(
        minutes=5
    )


@pytest.mark.parametrize(
    ("expr", "zone", "minimum", "expected"),
    [
        ("*/5 * * * *", "UTC", timedelta(minutes=15), timedelta(minutes=5)),
        ("0 * * * *", NEW_YORK, timedelta(hours=1), None),
        ("30 1,3 * * *", NEW_YORK, timedelta(minutes=90), timedelta(hours=1)),
        ("0 */6 * * *", NEW_YORK, timedelta(hours=6), timedelta(hours=5)),
        ("0 */6 * * *", "UTC", timedelta(hours=6), None),
        ("@every 10m", "UTC", timedelta(minutes=15), timedelta(minutes=10)),
        ("@every 1h", "UTC", timedelta(minutes=15), None),
    ],
)
def test_check_min_interval_returns_the_first_short_gap(
    expr: str, zone: str, minimum: timedelta, expected: timedelta | None
) -> None:
    found = check_min_interval(parse_schedule(expr), ZoneInfo(zone), minimum, _year(zone))
    assert found == expected


# --- DST anomalies --------------------------------------------------------------------------------

GAP = "the local time does not exist (spring-forward gap)"
OVERSHOOT = "robfig/cron's search overshoots it after the DST change"


@pytest.mark.parametrize(
    ("expr", "zone", "expected"),
    [
        ("30 2 * * *", NEW_YORK, [("skipped", "2026-03-08 02:30", GAP)]),
        (
            "30 1 * * *",
            NEW_YORK,
            [
                (
                    "repeated",
                    "2026-11-01 01:30",
                    "runs at 2026-11-01T05:30:00Z and 2026-11-01T06:30:00Z",
                )
            ],
        ),
        (
            "30 1 * * *",
            "Europe/London",
            [
                ("skipped", "2026-03-29 01:30", GAP),
                (
                    "repeated",
                    "2026-10-25 01:30",
                    "runs at 2026-10-25T00:30:00Z and 2026-10-25T01:30:00Z",
                ),
            ],
        ),
        (
            "15 2 * * *",
            LORD_HOWE,
            [("skipped", "2026-04-05 02:15", OVERSHOOT), ("skipped", "2026-10-04 02:15", GAP)],
        ),
        (
            "45 1 * * *",
            LORD_HOWE,
            [
                (
                    "repeated",
                    "2026-04-05 01:45",
                    "runs at 2026-04-04T14:45:00Z and 2026-04-04T15:15:00Z",
                )
            ],
        ),
        (
            "0 0 * * *",
            LORD_HOWE,
            [
                ("skipped", "2026-04-06 00:00", OVERSHOOT),
                ("skipped", "2026-10-05 00:00", OVERSHOOT),
            ],
        ),
        ("0 0 * * 0", "America/Santiago", [("skipped", "2026-09-06 00:00", GAP)]),
        ("0 9 * * *", NEW_YORK, []),
        ("30 2 * * *", "UTC", []),
        ("@every 30m", NEW_YORK, []),
    ],
)
def test_dst_anomalies(expr: str, zone: str, expected: list[tuple[str, str, str]]) -> None:
    found = dst_anomalies(parse_schedule(expr), ZoneInfo(zone), _year(zone))
    assert [(a.kind, f"{a.local_date} {a.local_time:%H:%M}", a.reason) for a in found] == expected


def test_dst_anomalies_reports_a_stalled_chain() -> None:
    found = dst_anomalies(parse_schedule("52 3 * * *"), ZoneInfo("Pacific/Chatham"), _year("UTC"))
    assert len(found) == 1
    assert (found[0].kind, found[0].local_date, found[0].local_time) == (
        "stalled",
        date(2026, 4, 5),
        time(2, 52),
    )
    assert "never runs again" in found[0].reason


def test_dst_anomalies_stays_within_the_horizon() -> None:
    found = dst_anomalies(
        parse_schedule("30 2 * * *"), ZoneInfo(NEW_YORK), _year(NEW_YORK), timedelta(days=60)
    )
    assert found == []
    every_minute = dst_anomalies(parse_schedule("* * * * *"), ZoneInfo(NEW_YORK), _year(NEW_YORK))
    assert [a.kind for a in every_minute] == ["skipped"] * 60 + ["repeated"] * 60
    assert str(every_minute[0]) == f"skipped 2026-03-08 02:00: {GAP}"
    assert isinstance(every_minute[0], DstAnomaly)


# --- formatting and input checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instant", "zone", "utc", "local"),
    [
        (
            "2026-11-27T00:00+00:00",
            "Asia/Tokyo",
            "2026-11-27T00:00:00Z",
            "2026-11-27 09:00 JST (+09:00)",
        ),
        (
            "2026-11-01T05:30+00:00",
            NEW_YORK,
            "2026-11-01T05:30:00Z",
            "2026-11-01 01:30 EDT (-04:00)",
        ),
        (
            "2026-11-01T06:30+00:00",
            NEW_YORK,
            "2026-11-01T06:30:00Z",
            "2026-11-01 01:30 EST (-05:00)",
        ),
        (
            "2026-01-01T00:00+00:00",
            "Asia/Kathmandu",
            "2026-01-01T00:00:00Z",
            "2026-01-01 05:45 +0545 (+05:45)",
        ),
        ("2026-01-01T09:00+09:00", "UTC", "2026-01-01T00:00:00Z", "2026-01-01 00:00 UTC (+00:00)"),
    ],
)
def test_describe_run(instant: str, zone: str, utc: str, local: str) -> None:
    assert describe_run(datetime.fromisoformat(instant), ZoneInfo(zone)) == RunTime(utc, local)


def test_naive_datetimes_and_foreign_zones_are_refused() -> None:
    schedule, tz = parse_schedule("@daily"), ZoneInfo("UTC")
    naive = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(TypeError, match="timezone-aware"):
        next_fire_times(schedule, tz, naive, 1)
    with pytest.raises(TypeError, match="timezone-aware"):
        min_interval(schedule, tz, naive)
    with pytest.raises(TypeError, match="timezone-aware"):
        dst_anomalies(schedule, tz, naive)
    with pytest.raises(TypeError, match="timezone-aware"):
        describe_run(naive, tz)
    with pytest.raises(TypeError, match="ZoneInfo"):
        next_fire_times(schedule, UTC, _year("UTC"), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        next_fire_times(schedule, tz, _year("UTC"), -1)
