"""robfig's ``SpecSchedule.Next`` on Go's wall-clock arithmetic, and calm stretches: plain
wall-clock fire times between offset changes (how a year is scanned quickly)."""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

from nocturne_operator.schedule.parse import CronSchedule, values_of
from nocturne_operator.schedule.zones import (
    DAY,
    EPOCH_ORDINAL,
    FAR_FUTURE,
    HORIZON,
    Wall,
    Zone,
)

# --- robfig SpecSchedule.Next ---------------------------------------------------------------------


class _Loop(NamedTuple):
    """One of robfig's absolute-time loops (hour, minute, second) for one schedule."""

    unit: int  # seconds added per step
    field: int  # index into Wall
    allowed: int  # bitset of values that end the loop
    steps: tuple[int, ...]  # from value v: steps until an allowed value or the wrap to 0


def _loop(unit: int, field: int, allowed: int, modulus: int) -> _Loop:
    steps = tuple(
        next(
            k
            for k in range(1, modulus + 1)
            if (v + k) % modulus == 0 or allowed >> (v + k) % modulus & 1
        )
        for v in range(modulus)
    )
    return _Loop(unit, field, allowed, steps)


_SECOND_LOOP = _loop(1, 5, 1, 60)  # robfig's second field is always {0} for standard specs


@dataclass(frozen=True, slots=True)
class _Plan:
    """Per-schedule tables derived once from the bitsets."""

    mods: tuple[int, ...]  # allowed minutes of the day, ascending
    index: dict[int, int]  # minute of the day -> position in mods
    hour_loop: _Loop
    minute_loop: _Loop

    def gaps(self, lo: int, hi: int) -> list[int]:
        """Minutes between consecutive mods[lo..hi]."""
        return [self.mods[i + 1] - self.mods[i] for i in range(lo, hi)]


@functools.lru_cache(maxsize=256)
def plan_of(s: CronSchedule) -> _Plan:
    mods = tuple(h * 60 + m for h in values_of(s.hour) for m in values_of(s.minute))
    return _Plan(
        mods=mods,
        index={m: i for i, m in enumerate(mods)},
        hour_loop=_loop(3600, 3, s.hour, 24),
        minute_loop=_loop(60, 4, s.minute, 60),
    )


def _dom_dow_match(s: CronSchedule, day: int, weekday: int) -> bool:
    """robfig dayMatches: AND if either field carries the star bit, otherwise OR."""
    dom_ok, dow_ok = bool(s.dom >> day & 1), bool(s.dow >> weekday & 1)
    return (dom_ok and dow_ok) if (s.dom_star or s.dow_star) else (dom_ok or dow_ok)


def fires_on(s: CronSchedule, day_number: int) -> bool:
    d = date.fromordinal(day_number + EPOCH_ORDINAL)
    return bool(s.month >> d.month & 1) and _dom_dow_match(s, d.day, (day_number + 4) % 7)


def spec_next(s: CronSchedule, z: Zone, after: int) -> int | None:
    """robfig SpecSchedule.Next(after) in zone z: the first fire time > after, or None.

    Each ``continue`` is robfig's ``goto WRAP``. The month and day loops step the wall clock
    (AddDate) one unit at a time as robfig does; the hour, minute and second loops add absolute
    time and are jumped over in one go where no offset change lies in between.
    """
    plan = plan_of(s)
    t = after + 1
    added = False  # robfig resets the lower fields only the first time a field does not match
    year_limit = z.wall(t).year + 5
    while True:
        w = z.wall(t)
        if w.year > year_limit:
            return None
        if not s.month >> w.month & 1:
            t, w = _next_month(s, z, z.date(w.year, w.month) if not added else t)
            added = True
            if w.month == 1:
                continue
        if not _dom_dow_match(s, w.day, w.weekday):
            t, w = _next_day(s, z, z.date(w.year, w.month, w.day) if not added else t)
            added = True
            if w.day == 1:
                continue
        if not s.hour >> w.hour & 1:
            start = z.date(w.year, w.month, w.day, w.hour * 3600) if not added else t
            t, w = _advance(z, start, plan.hour_loop)
            added = True
            if w.hour == 0:
                continue
        if not s.minute >> w.minute & 1:
            t, w = _advance(z, t - t % 60 if not added else t, plan.minute_loop)  # Truncate(Minute)
            added = True
            if w.minute == 0:
                continue
        if w.second == 0:
            return t
        t, w = _advance(z, t, _SECOND_LOOP)  # always ends on :00, robfig's wrap
        added = True


def _next_month(s: CronSchedule, z: Zone, t: int) -> tuple[int, Wall]:
    """robfig's month loop: AddDate(0, 1, 0) until the month matches or a year starts."""
    while True:
        w = z.wall(t)
        t = z.date(w.year, w.month + 1, w.day, w.clock)
        w = z.wall(t)
        if w.month == 1 or s.month >> w.month & 1:
            return t, w


def _next_day(s: CronSchedule, z: Zone, t: int) -> tuple[int, Wall]:
    """robfig's day loop: AddDate(0, 0, 1) until the day matches or a month starts."""
    while True:
        w = z.wall(t)
        t = z.date(w.year, w.month, w.day + 1, w.clock)
        w = z.wall(t)
        if w.hour != 0:
            # robfig's fix for zones where midnight does not exist: back to 0h or on to 24h.
            t += (24 - w.hour) * 3600 if w.hour > 12 else -w.hour * 3600
            w = z.wall(t)
        if w.day == 1 or _dom_dow_match(s, w.day, w.weekday):
            return t, w


def _advance(z: Zone, t: int, loop: _Loop) -> tuple[int, Wall]:
    """Add ``loop.unit`` until the field is allowed or wraps to 0, as robfig's loop does."""
    w = z.wall(t)
    while True:
        k = loop.steps[w[loop.field]]
        change = z.next_transition(t, k * loop.unit)
        if change is None:
            t += k * loop.unit
        else:  # step just across the offset change: the wall clock jumps there
            t += ((change - t - 1) // loop.unit + 1) * loop.unit
        w = z.wall(t)
        value = w[loop.field]
        if value == 0 or loop.allowed >> value & 1:
            return t, w


# --- calm stretches: plain wall-clock fire times between offset changes ---------------------------


@dataclass(frozen=True, slots=True)
class _Block:
    """A fire time robfig returned, followed by fires it finds exactly where the wall clock says.

    The plain fires are every allowed minute of ``days`` (local day numbers), from ``mods[start_k]``
    on the first day to ``mods[last_k]`` on the last, all at one UTC ``offset``.
    """

    head: int
    plan: _Plan
    offset: int
    days: tuple[int, ...] = ()
    start_k: int = 0
    last_k: int = 0
    stalls: bool = False  # robfig's Next does not advance past ``head``: the chain ends here

    def _at(self, day: int, k: int) -> int:
        return day * DAY + self.plan.mods[k] * 60 - self.offset

    @property
    def last(self) -> int:
        return self._at(self.days[-1], self.last_k) if self.days else self.head

    def fires(self, since: int = -FAR_FUTURE) -> Iterator[int]:
        """Fire times in order, from the first one >= since."""
        if self.head >= since:
            yield self.head
        n = len(self.plan.mods)
        first_day = bisect.bisect_left(self.days, (since + self.offset) // DAY)
        for i in range(first_day, len(self.days)):
            lo = self.start_k if i == 0 else 0
            hi = self.last_k if i == len(self.days) - 1 else n - 1
            for k in range(lo, hi + 1):
                t = self._at(self.days[i], k)
                if t >= since:
                    yield t

    def gaps(self) -> Iterator[int]:
        fires = self.fires()
        previous = next(fires)
        for t in fires:
            yield t - previous
            previous = t

    def min_gap(self) -> int | None:
        """Smallest gap between consecutive fires, in seconds, from the day structure alone."""
        if not self.days:
            return None
        n, days, plan = len(self.plan.mods), self.days, self.plan
        if len(days) == 1:
            minutes = plan.gaps(self.start_k, self.last_k)
        else:
            minutes = plan.gaps(self.start_k, n - 1) + plan.gaps(0, self.last_k)
            if len(days) > 2:
                minutes += plan.gaps(0, n - 1)
            wrap = plan.mods[0] - plan.mods[-1]
            minutes.append(min(b - a for a, b in itertools.pairwise(days)) * 1440 + wrap)
        head_gap = self._at(days[0], self.start_k) - self.head
        return min([head_gap, *(m * 60 for m in minutes)])


def _plain_block(s: CronSchedule, z: Zone, fire: int, end: int) -> _Block:
    """``fire`` and the longest run of fires after it (< end) that the plain wall clock predicts.

    A Next call is plain when no offset change can influence it: none between its start and its
    result, and when it walks whole days (time.Date at midnights) none within a day of either.
    """
    plan = plan_of(s)
    offset = z.offset(fire)
    day, second_of_day = divmod(fire + offset, DAY)
    # robfig re-checks a field only after a wrap, so across a DST change it can fire at a time the
    # schedule does not name: on another day (Asia/Beirut changes at midnight) or in another hour
    # (a 30-minute change moves the hour without wrapping the minute). It moves on from there.
    k = plan.index.get(second_of_day // 60)
    if k is None or not fires_on(s, day):
        return _Block(fire, plan, offset)
    before = z.prev_transition(fire, 2 * DAY)
    after = z.next_transition(fire, HORIZON)
    stop = min(end, fire + HORIZON, end if after is None else after)
    n = len(plan.mods)

    def at(day: int, k: int) -> int:
        return day * DAY + plan.mods[k] * 60 - offset

    start_k, last_k, days = k + 1, k, [day]
    while last_k + 1 < n and at(day, last_k + 1) < stop:
        last_k += 1
    if last_k == n - 1:
        if last_k == k:  # the head ends its day: plain fires start on a later day
            start_k, days = 0, []
        for candidate in range(day + 1, (stop + offset) // DAY + 1):
            if not fires_on(s, candidate):
                continue
            first = at(candidate, 0)
            previous_day = days[-1] if days else day
            walks_days = candidate != previous_day + 1
            if first >= stop or (
                walks_days
                and not (
                    (before is None or at(previous_day, n - 1) - DAY > before)
                    and (after is None or first + DAY < after)
                )
            ):
                break
            days.append(candidate)
            last_k = n - 1
            while at(candidate, last_k) >= stop:
                last_k -= 1
            if last_k < n - 1:
                break
    if not days or (days == [day] and last_k == k):
        return _Block(fire, plan, offset)
    return _Block(fire, plan, offset, tuple(days), start_k, last_k)


def blocks(s: CronSchedule, z: Zone, after: int, end: int) -> Iterator[_Block]:
    """The robfig Next chain from ``after`` as plain blocks, each followed by one exact Next call.

    Stops after yielding the first block that starts at or after ``end``, or one that ``stalls``.
    """
    fire = spec_next(s, z, after)
    while fire is not None:
        block = _plain_block(s, z, fire, end)
        following = spec_next(s, z, block.last)
        if following is not None and following <= block.last:
            # Only a time robfig reached off-schedule can do this (plain fires always advance).
            # The controller computes t1 = Next(last), t2 = Next(t1) and, with t2 <= t1, reports
            # "time difference between two schedules is less than 1 second": it never runs t1.
            yield _Block(block.head, block.plan, block.offset, stalls=True)
            return
        yield block
        if block.head >= end:
            return
        fire = following
