"""Cron semantics exactly as the Kubernetes CronJob controller fires them.

The controller (k8s 1.35) validates ``spec.schedule`` with robfig/cron v3 ``ParseStandard`` plus a
rule of its own (no ``TZ``/``CRON_TZ`` anywhere in the string), parses
``"TZ=<timeZone> <schedule>"`` and then chains ``Schedule.Next``. This module reproduces both on
:mod:`zoneinfo`, mirroring Go's wall-clock arithmetic: ``time.Date`` normalisation of skipped and
repeated local times, ``AddDate`` working on the wall clock and ``Add`` on absolute time. That is
what makes robfig's DST behaviour come out the same: a time in a spring-forward gap never fires,
a time in a fall-back overlap fires twice, and after a 30-minute change (Australia/Lord_Howe) the
search can carry a ``:30`` minute and skip a regular run (``0 0 * * *`` does not run on the Monday
after the April change). Results were checked against robfig/cron v3.0.1 itself.

Where the controller differs from a raw ``Next`` chain (pkg/controller/cronjob/utils.go):

* It chains ``Next`` from ``status.lastScheduleTime`` (or the creation time), so ``@every`` is
  anchored on when the CronJob was created, not on the clock.
* When runs were missed it starts only the most recent one (bounded by
  ``startingDeadlineSeconds``); more than 100 missed runs raise a ``TooManyMissedTimes`` event.
* Job names carry the scheduled time in minutes, so two fire times within one minute
  (``@every`` below a minute) map to the same Job name and only one runs.
* A schedule for which ``Next`` finds nothing within robfig's five-year search (``0 0 30 2 *``)
  passes apiserver validation but never runs; :func:`parse_schedule` rejects it.

This module is the public API (fire times, the minimum interval, DST anomalies, run times as
people read them); ``parse`` holds the parser, ``zones`` Go's zone arithmetic and ``fires``
robfig's ``Next`` with the calm-stretch scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from nocturne_operator.api.timestamps import rfc3339
from nocturne_operator.schedule.fires import blocks, fires_on, plan_of, spec_next
from nocturne_operator.schedule.parse import CronError, CronSchedule, parse_schedule
from nocturne_operator.schedule.zones import (
    DAY,
    EPOCH,
    EPOCH_ORDINAL,
    FAR_FUTURE,
    Zone,
    cached_zone,
)

# The schedule room's public API: parsing (``parse``), zones (``zones``) and robfig's Next
# (``fires``) are its parts.
__all__ = [
    "CronError",
    "CronSchedule",
    "DstAnomaly",
    "RunTime",
    "check_min_interval",
    "describe_run",
    "dst_anomalies",
    "min_interval",
    "next_fire_times",
    "parse_schedule",
]


def _unix(dt: datetime, what: str) -> int:
    if not isinstance(dt, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise TypeError(f"{what} must be timezone-aware, got naive {dt.isoformat()}")
    return (dt - EPOCH) // timedelta(seconds=1)


def _zone_of(tz: ZoneInfo) -> Zone:
    if not isinstance(tz, ZoneInfo):
        raise TypeError(f"tz must be a zoneinfo.ZoneInfo, not {type(tz).__name__}")
    return cached_zone(tz)


def _every_seconds(schedule: CronSchedule) -> int | None:
    return None if schedule.every is None else schedule.every // timedelta(seconds=1)


def next_fire_times(
    schedule: CronSchedule, tz: ZoneInfo, after: datetime, count: int
) -> list[datetime]:
    """The next ``count`` times (> after, aware, in tz) robfig's Next chain yields from ``after``.

    Fewer are returned when robfig's five-year search finds nothing more, or when Next stops
    advancing (a robfig bug after some historical DST changes, e.g. America/St_Johns at 00:01 in
    2008): the controller then runs neither that time nor any later one.

    Next from any moment before the first of them yields that first one again (nothing fires in
    between), so the chain is kept per schedule, zone and count and reused until its first time
    has passed: every pass of a schedule asks for its next runs.
    """
    z, start = _zone_of(tz), _unix(after, "after")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    every = _every_seconds(schedule)
    if every is not None:  # ConstantDelaySchedule.Next: drop sub-seconds, add the delay
        return [datetime.fromtimestamp(start + every * i, tz) for i in range(1, count + 1)]
    if count == 0:
        return []
    key = (schedule, tz, count)
    kept = _NEXT_FIRES.get(key)
    if kept is not None and kept[0] <= start < kept[1]:
        return list(kept[2])
    times = _chain(schedule, z, tz, start, count)
    if len(_NEXT_FIRES) >= _NEXT_FIRES_MAX:
        _NEXT_FIRES.clear()
    if times:
        _NEXT_FIRES[key] = (start, _unix(times[0], "fire"), tuple(times))
    return times


def _chain(schedule: CronSchedule, z: Zone, tz: ZoneInfo, start: int, count: int) -> list[datetime]:
    times: list[datetime] = []
    for block in blocks(schedule, z, start, FAR_FUTURE):
        if block.stalls:
            break
        for t in block.fires():
            times.append(datetime.fromtimestamp(t, tz))
            if len(times) == count:
                return times
    return times


# (schedule, zone, count) -> (computed from, its first fire, the chain), both in Unix seconds.
_Chain = tuple[int, int, tuple[datetime, ...]]
_NEXT_FIRES: dict[tuple[CronSchedule, ZoneInfo, int], _Chain] = {}
_NEXT_FIRES_MAX = 8192


def _year_window(z: Zone, year_start: datetime) -> tuple[int, int]:
    start = _unix(year_start, "year_start")
    w = z.wall(start)
    return start, z.date(w.year + 1, w.month, w.day, w.clock)


def min_interval(schedule: CronSchedule, tz: ZoneInfo, year_start: datetime) -> timedelta:
    """Smallest real time between consecutive fires, over the year from ``year_start``.

    Pairs count when their first fire falls in [year_start, year_start + 1 year); if none does,
    the first pair after year_start is used. Raises CronError if fewer than two fires exist.
    """
    z = _zone_of(tz)
    start, end = _year_window(z, year_start)
    every = _every_seconds(schedule)
    if every is not None:
        return timedelta(seconds=every)
    end = _judged_until(schedule, z, start, end)
    best: int | None = None
    previous: int | None = None
    for block in blocks(schedule, z, start - 1, end):
        if block.stalls:
            break
        if previous is not None:
            best = _smaller(best, block.head - previous)
            if block.head >= end:
                break
        best = _smaller(best, block.min_gap())
        previous = block.last
        if best is not None and best <= 60:  # fires sit on whole minutes: nothing can be closer
            break
    if best is None:
        raise CronError(f"fewer than two fire times after {year_start.isoformat()}")
    return timedelta(seconds=best)


def _judged_until(s: CronSchedule, z: Zone, start: int, end: int) -> int:
    """The year's end, or just past the first fire if the schedule skips the whole year."""
    first = spec_next(s, z, start - 1)
    if first is None:
        raise CronError("never fires (robfig/cron searches five years ahead)")
    return max(end, first + 1)


def _smaller(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def check_min_interval(
    schedule: CronSchedule, tz: ZoneInfo, minimum: timedelta, year_start: datetime
) -> timedelta | None:
    """The first gap (in time order) shorter than ``minimum`` over the same year as
    :func:`min_interval`, or None if there is none. Stops at the first offending gap."""
    z = _zone_of(tz)
    start, end = _year_window(z, year_start)
    limit = minimum // timedelta(seconds=1) + (1 if minimum % timedelta(seconds=1) else 0)
    every = _every_seconds(schedule)
    if every is not None:
        return timedelta(seconds=every) if every < limit else None
    end = _judged_until(schedule, z, start, end)
    previous: int | None = None
    for block in blocks(schedule, z, start - 1, end):
        if block.stalls:
            break
        if previous is not None:
            if block.head - previous < limit:
                return timedelta(seconds=block.head - previous)
            if block.head >= end:
                return None
        inner = block.min_gap()
        if inner is not None and inner < limit:
            return timedelta(seconds=next(g for g in block.gaps() if g < limit))
        previous = block.last
    return None


@dataclass(frozen=True, slots=True)
class DstAnomaly:
    """A local fire time a DST change makes robfig skip, run twice, or get stuck on."""

    kind: Literal["skipped", "repeated", "stalled"]
    local_date: date
    local_time: time
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.local_date} {self.local_time:%H:%M}: {self.reason}"


def dst_anomalies(
    schedule: CronSchedule,
    tz: ZoneInfo,
    start: datetime,
    horizon: timedelta = timedelta(days=366),
) -> list[DstAnomaly]:
    """DST anomalies among the fires next_fire_times(start, ...) yields up to start + horizon.

    "skipped": a local time the schedule names never runs (it falls in a spring-forward gap, or
    robfig's search overshoots it after a change); "repeated": it runs twice (fall-back overlap);
    "stalled": robfig's Next stops advancing there, so the CronJob never runs again.
    """
    z = _zone_of(tz)
    lo = _unix(start, "start")
    hi = lo + horizon // timedelta(seconds=1)
    if schedule.every is not None:
        return []  # a constant delay is absolute time: DST cannot move it
    windows: list[list[int]] = []  # [from, to] around each offset change, merged
    for change in z.transitions(lo, hi):
        a, b = max(lo, change - 2 * DAY), change + 2 * DAY
        if windows and a <= windows[-1][1]:
            windows[-1][1] = b
        else:
            windows.append([a, b])
    found: list[DstAnomaly] = []
    fired: list[int] = []  # fires in the current window, then the first one after it
    for block in blocks(schedule, z, lo, hi + 3 * DAY):
        if block.stalls:
            local = datetime.fromtimestamp(block.head, tz)
            found.append(DstAnomaly("stalled", local.date(), local.time(), _STALL_REASON))
            break
        while windows:
            window_from, window_to = windows[0]
            for t in block.fires(since=window_from + 1):
                fired.append(t)
                if t > window_to:
                    break
            if not fired or fired[-1] <= window_to:
                break  # the window goes on in the next block
            found += _window_anomalies(schedule, z, window_from, fired)
            windows.pop(0)
            fired = []
        if not windows:
            break
    key_lo, key_hi = _minute_key(z, lo), _minute_key(z, hi)
    # A long Next call can reach across two changes' windows: report each local time once.
    unique = {(a.kind, _anomaly_key(a)): a for a in found if key_lo < _anomaly_key(a) <= key_hi}
    return sorted(unique.values(), key=_anomaly_key)


_STALL_REASON = (
    "robfig/cron's Next does not advance past this time; the CronJob controller reports "
    '"time difference between two schedules is less than 1 second" and never runs again'
)


def _anomaly_key(a: DstAnomaly) -> int:
    day = a.local_date.toordinal() - EPOCH_ORDINAL
    return day * 1440 + a.local_time.hour * 60 + a.local_time.minute


def _minute_key(z: Zone, t: int) -> int:
    """Local wall-clock minutes since 1970-01-01 00:00."""
    return (t + z.offset(t)) // 60


def _window_anomalies(s: CronSchedule, z: Zone, since: int, fired: list[int]) -> list[DstAnomaly]:
    """Compare the local times the schedule names with those robfig ran, after ``since`` and
    before the last of ``fired``."""
    key_from, key_to = _minute_key(z, since), _minute_key(z, fired[-1])
    runs: dict[int, list[int]] = {}
    for t in fired[:-1]:
        runs.setdefault(_minute_key(z, t), []).append(t)
    found: list[DstAnomaly] = []
    for day in range(key_from // 1440, key_to // 1440 + 1):
        if not fires_on(s, day):
            continue
        for m in plan_of(s).mods:
            key = day * 1440 + m
            if not key_from < key < key_to or len(runs.get(key, ())) == 1:
                continue
            d, clock = date.fromordinal(day + EPOCH_ORDINAL), time(m // 60, m % 60)
            if key in runs:
                times = " and ".join(_utc_stamp(t) for t in runs[key])
                found.append(DstAnomaly("repeated", d, clock, f"runs at {times}"))
            elif _minute_key(z, z.date(d.year, d.month, d.day, m * 60)) == key:
                found.append(DstAnomaly("skipped", d, clock, _OVERSHOOT_REASON))
            else:
                found.append(DstAnomaly("skipped", d, clock, _GAP_REASON))
    return found


_GAP_REASON = "the local time does not exist (spring-forward gap)"
_OVERSHOOT_REASON = "robfig/cron's search overshoots it after the DST change"


@dataclass(frozen=True, slots=True)
class RunTime:
    """A fire time for humans: ``utc`` in RFC 3339, ``local`` with the zone's abbreviation."""

    utc: str
    local: str


def _utc_stamp(t: int) -> str:
    return rfc3339(datetime.fromtimestamp(t, UTC))


def describe_run(dt_utc: datetime, tz: ZoneInfo) -> RunTime:
    """``2026-11-27T00:00:00Z`` and ``2026-11-27 09:00 JST (+09:00)`` for an aware instant."""
    t = _unix(dt_utc, "dt_utc")
    if not isinstance(tz, ZoneInfo):
        raise TypeError(f"tz must be a zoneinfo.ZoneInfo, not {type(tz).__name__}")
    local = dt_utc.astimezone(tz)
    seconds = (local.utcoffset() or timedelta()) // timedelta(seconds=1)
    sign, seconds = ("-" if seconds < 0 else "+"), abs(seconds)
    offset = f"{sign}{seconds // 3600:02d}:{seconds // 60 % 60:02d}"
    if seconds % 60:
        offset += f":{seconds % 60:02d}"
    return RunTime(
        utc=_utc_stamp(t),
        local=f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({offset})",
    )
