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
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from nocturne_operator.api.timestamps import rfc3339

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


class CronError(ValueError):
    """A schedule the CronJob controller would reject, or one that can never fire."""


# --- parsing: robfig/cron v3 ParseStandard ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTH_NAMES)}),
    _Field("day-of-week", 0, 6, {n: i for i, n in enumerate(_DOW_NAMES)}),
)
_NAME_HINT = {"month": " or a month name (JAN-DEC)", "day-of-week": " or a day name (SUN-SAT)"}

# Go's strings.Fields splits on unicode.IsSpace, which (unlike str.split) excludes \x1c-\x1f.
_GO_SPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_GO_INT = re.compile(r"[+-]?[0-9]+")  # strconv.Atoi: optional sign, ASCII digits, int64
_INT64 = 1 << 63

_DESCRIPTORS = {  # robfig parseDescriptor; "*" keeps robfig's star bit
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY = "@every "
_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed schedule: robfig's SpecSchedule bitsets (bit v set = value v allowed), or @every.

    ``dom_star``/``dow_star`` record robfig's star bit (``*``, ``?`` or ``*/1``; not ``*/2``):
    if either is set a day must match both fields, otherwise either field.
    """

    expression: str
    minute: int = 0
    hour: int = 0
    dom: int = 0
    month: int = 0
    dow: int = 0
    dom_star: bool = False
    dow_star: bool = False
    every: timedelta | None = None


def parse_schedule(expr: str) -> CronSchedule:
    """Parse exactly what ``batch/v1`` CronJob accepts; raise :class:`CronError` otherwise.

    Also rejects schedules that can never fire (``0 0 30 2 *``), which the apiserver accepts.
    robfig's dialect: minute hour day-of-month month day-of-week; day-of-week is 0-6 (7 is an
    error), names (JAN-DEC, SUN-SAT) in any case, ``?`` means ``*`` in any field, ``N/s`` means
    ``N-max/s``, empty list elements are ignored and so is anything after ``*-``. ``@every``
    takes a Go duration, rounded down to whole seconds and raised to at least one second.
    """
    if not isinstance(expr, str):
        raise TypeError(f"schedule must be a string, not {type(expr).__name__}")
    if not expr:
        raise CronError("schedule is empty")
    if "TZ" in expr:  # k8s validateScheduleFormat: strings.Contains(schedule, "TZ")
        raise CronError("cannot use TZ or CRON_TZ in schedule, use spec.timeZone instead")
    if expr.startswith("@"):
        return _parse_descriptor(expr)
    fields = [f for f in _GO_SPACE.split(expr) if f]
    if len(fields) != len(_FIELDS):
        hint = "; a seconds field is not supported" if len(fields) == len(_FIELDS) + 1 else ""
        raise CronError(
            "expected 5 fields (minute hour day-of-month month day-of-week), "
            f"found {len(fields)}{hint}"
        )
    bits = [_parse_field(text, spec) for text, spec in zip(fields, _FIELDS, strict=True)]
    schedule = CronSchedule(
        expression=expr,
        minute=bits[0][0],
        hour=bits[1][0],
        dom=bits[2][0],
        month=bits[3][0],
        dow=bits[4][0],
        dom_star=bits[2][1],
        dow_star=bits[4][1],
    )
    _check_fires(schedule, fields)
    return schedule


def _parse_descriptor(expr: str) -> CronSchedule:
    if expr in _DESCRIPTORS:
        parsed = parse_schedule(_DESCRIPTORS[expr])
        return CronSchedule(
            expression=expr,
            minute=parsed.minute,
            hour=parsed.hour,
            dom=parsed.dom,
            month=parsed.month,
            dow=parsed.dow,
            dom_star=parsed.dom_star,
            dow_star=parsed.dow_star,
        )
    if expr.startswith(_EVERY):
        text = expr[len(_EVERY) :]
        try:
            nanos = _go_duration(text)
        except ValueError as exc:
            raise CronError(f'@every duration "{text}": {exc}') from None
        # robfig Every(): below one second means one second; sub-second parts are dropped.
        return CronSchedule(expression=expr, every=timedelta(seconds=max(nanos, 10**9) // 10**9))
    raise CronError(
        f'unknown descriptor "{expr}" (expected @yearly, @annually, @monthly, @weekly, @daily, '
        "@midnight, @hourly or @every <duration>)"
    )


def _parse_field(text: str, spec: _Field) -> tuple[int, bool]:
    """One comma-separated field as robfig getField: (bits, star bit)."""
    bits, star = 0, False
    for part in text.split(","):
        if part:  # strings.FieldsFunc drops empty elements, so "1,,2" and even "," parse
            part_bits, part_star = _parse_range(part, text, spec)
            bits |= part_bits
            star = star or part_star
    return bits, star


def _parse_range(expr: str, text: str, spec: _Field) -> tuple[int, bool]:
    """robfig getRange: ``number | number "-" number [ "/" number ]``, ``*``/``?`` with a step."""
    where = f'{spec.name} field "{text}"'
    range_and_step = expr.split("/")
    low_high = range_and_step[0].split("-")
    star = low_high[0] in ("*", "?")
    if star:  # robfig ignores whatever follows "*-" or "?-"
        start, end = spec.low, spec.high
    else:
        start = _value(low_high[0], where, spec, "range start" if len(low_high) > 1 else "value")
        if len(low_high) == 1:
            end = start
        elif len(low_high) == 2:
            end = _value(low_high[1], where, spec, "range end")
        else:
            raise CronError(f'{where}: too many "-" in "{expr}"')
    step = 1
    if len(range_and_step) == 2:
        step = _number(range_and_step[1], where, "step")
        if step < 0:
            raise CronError(f'{where}: step "{range_and_step[1]}" must be a positive number')
        if len(low_high) == 1:  # "N/step" means "N-max/step"
            end = spec.high
        star = star and step == 1  # "*/2" is not a star for the day-of-month/week rule
    elif len(range_and_step) > 2:
        raise CronError(f'{where}: too many "/" in "{expr}"')
    bad = next((v for v in (start, end) if not spec.low <= v <= spec.high), None)
    if bad is not None:
        sunday = " (use 0 or SUN for Sunday)" if spec.name == "day-of-week" and bad == 7 else ""
        raise CronError(f"{where}: value {bad} out of range {spec.low}-{spec.high}{sunday}")
    if start > end:
        raise CronError(f"{where}: range start {start} is after range end {end}")
    if step == 0:
        raise CronError(f'{where}: step "{range_and_step[1]}" must be a positive number')
    return sum(1 << v for v in range(start, end + 1, step)), star


def _value(token: str, where: str, spec: _Field, what: str) -> int:
    if spec.names is not None:
        # Go's strings.ToLower maps U+0130 to a plain "i"; Python adds a combining dot.
        named = spec.names.get(token.replace("\u0130", "i").lower())
        if named is not None:
            return named
    return _number(token, where, what, _NAME_HINT.get(spec.name, ""))


def _number(token: str, where: str, what: str, hint: str = "") -> int:
    """strconv.Atoi, with robfig's "negative number not allowed" left to the caller."""
    if not token:
        raise CronError(f"{where}: missing {what}")
    if not _GO_INT.fullmatch(token):
        raise CronError(f'{where}: "{token}" is not a number{hint}')
    number = int(token)
    if not -_INT64 <= number < _INT64:
        raise CronError(f"{where}: {what} {token} is too large")
    return number


def _go_duration(text: str) -> int:
    """time.ParseDuration in nanoseconds, including its overflow rules; ValueError on failure."""
    rest, negative = text, False
    if rest[:1] in ("-", "+"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError("invalid duration")
    total = 0
    while rest:
        value, rest = _duration_term(rest)
        total += value
        if total > _INT64:
            raise ValueError("invalid duration")
    if not negative and total > _INT64 - 1:
        raise ValueError("invalid duration")
    return -total if negative else total


def _duration_term(text: str) -> tuple[int, str]:
    """One ``[0-9]*(.[0-9]*)?unit`` term of a Go duration: (nanoseconds, rest of the text)."""
    match = re.match(r"([0-9]*)(?:\.([0-9]*))?([^.0-9]*)", text)
    digits, fraction_digits, unit = match.groups("") if match else ("", "", "")
    if not text or not (text[0] == "." or "0" <= text[0] <= "9") or not (digits or fraction_digits):
        raise ValueError("invalid duration")
    if not unit:
        raise ValueError("missing unit")
    if unit not in _NS_PER_UNIT:
        raise ValueError(f'unknown unit "{unit}"')
    per_unit, value = _NS_PER_UNIT[unit], int(digits or "0")
    if value > _INT64 // per_unit:
        raise ValueError("invalid duration")
    fraction, scale = 0, 1.0
    for ch in fraction_digits:  # leadingFraction: stops gaining precision instead of overflowing
        if fraction > (_INT64 - 1) // 10 or fraction * 10 + int(ch) > _INT64:
            break
        fraction, scale = fraction * 10 + int(ch), scale * 10
    # Go adds the fractional part through float64; mirror it bit for bit.
    value = value * per_unit + int(float(fraction) * (float(per_unit) / scale))
    if value > _INT64:
        raise ValueError("invalid duration")
    return value, text[match.end() if match else 0 :]


def _days_in_month(month: int) -> int:
    return 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31


def _check_fires(s: CronSchedule, fields: list[str]) -> None:
    """Reject bitsets that match no date at all (robfig's Next would return the zero time)."""
    for i, bits in ((0, s.minute), (1, s.hour), (3, s.month)):
        if not bits:  # only "," (or ",,") gets here: robfig parses it as an empty set
            raise CronError(f'never fires: {_FIELDS[i].name} field "{fields[i]}" matches no value')
    possible_days = 0
    for month in _bits(s.month):
        possible_days |= (1 << (_days_in_month(month) + 1)) - 2
    dom_fires = bool(s.dom & possible_days)
    if s.dow_star:  # AND rule with every weekday allowed: the day of month decides
        fires = dom_fires
    elif s.dom_star:
        fires = bool(s.dow)
    else:
        fires = dom_fires or bool(s.dow)
    if not fires:
        raise CronError(
            f'never fires: no date matches day-of-month "{fields[2]}", month "{fields[3]}" '
            f'and day-of-week "{fields[4]}"'
        )


def _bits(mask: int) -> list[int]:
    return [v for v in range(mask.bit_length()) if mask >> v & 1]


# --- time zones with Go's arithmetic -------------------------------------------------------------

_DAY = 86_400
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = _EPOCH.date().toordinal()
_CHUNK_BITS = 22  # offsets are cached per ~48.5-day chunk of Unix time
# tzdata has no two offset changes closer than ~96 h since 1900 (168 h since 1970), so sampling
# once a day finds every transition; each one is then located to the second by bisection.
_SAMPLE = _DAY
_HORIZON = 400 * _DAY  # how far a calm stretch is extended before re-checking
_FAR_FUTURE = 253_402_300_799  # 9999-12-31T23:59:59Z, the end of datetime's range


class _Wall(NamedTuple):
    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    weekday: int  # Go's time.Weekday: Sunday is 0

    @property
    def clock(self) -> int:
        return self.hour * 3600 + self.minute * 60 + self.second


class _Zone:
    """A ZoneInfo seen the way Go's time package sees a Location, on Unix seconds."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._chunks: dict[int, tuple[list[int], list[int]]] = {}

    def _raw_offset(self, x: int) -> int:
        offset = datetime.fromtimestamp(x, self.tz).utcoffset()
        return 0 if offset is None else offset // timedelta(seconds=1)

    def _chunk(self, k: int) -> tuple[list[int], list[int]]:
        """Offset change points (first one is the chunk start) and the offset from each."""
        if k not in self._chunks:
            lo, hi = k << _CHUNK_BITS, (k + 1) << _CHUNK_BITS
            starts, offsets = [lo], [self._raw_offset(lo)]
            prev = lo
            for x in [*range(lo + _SAMPLE, hi, _SAMPLE), hi]:
                current = self._raw_offset(x)
                if current != offsets[-1]:
                    a, b = prev, x  # offset(a) is old, offset(b) is new
                    while b - a > 1:
                        mid = (a + b) // 2
                        a, b = (mid, b) if self._raw_offset(mid) == offsets[-1] else (a, mid)
                    starts.append(b)
                    offsets.append(current)
                prev = x
            self._chunks[k] = (starts, offsets)
        return self._chunks[k]

    def offset(self, x: int) -> int:
        starts, offsets = self._chunk(x >> _CHUNK_BITS)
        return offsets[bisect.bisect_right(starts, x) - 1]

    def transitions(self, lo: int, hi: int) -> list[int]:
        """Instants T in (lo, hi] at which the UTC offset changes (offset(T) is the new one)."""
        found: list[int] = []
        for k in range(lo >> _CHUNK_BITS, (hi >> _CHUNK_BITS) + 1):
            found.extend(t for t in self._chunk(k)[0][1:] if lo < t <= hi)
        return found

    def next_transition(self, x: int, within: int) -> int | None:
        for k in range(x >> _CHUNK_BITS, ((x + within) >> _CHUNK_BITS) + 1):
            for t in self._chunk(k)[0][1:]:
                if x < t:
                    return t if t <= x + within else None
        return None

    def prev_transition(self, x: int, within: int) -> int | None:
        found = self.transitions(x - within, x)
        return found[-1] if found else None

    def wall(self, x: int) -> _Wall:
        days, secs = divmod(x + self.offset(x), _DAY)
        d = date.fromordinal(days + _EPOCH_ORDINAL)
        return _Wall(
            d.year, d.month, d.day, secs // 3600, secs // 60 % 60, secs % 60, (days + 4) % 7
        )

    def date(self, year: int, month: int, day: int = 1, clock: int = 0) -> int:
        """Go's time.Date (``clock`` in seconds after midnight): out-of-range parts carry over,
        and local times in a gap or an overlap resolve the way Go resolves them."""
        year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
        days = date(year, month, 1).toordinal() - _EPOCH_ORDINAL + day - 1
        local = days * _DAY + clock
        # Go looks the offset up at the local time read as UTC, then once more at the result.
        return local - self.offset(local - self.offset(local))


@functools.lru_cache(maxsize=32)
def _zone(tz: ZoneInfo) -> _Zone:
    return _Zone(tz)


# --- robfig SpecSchedule.Next ---------------------------------------------------------------------


class _Loop(NamedTuple):
    """One of robfig's absolute-time loops (hour, minute, second) for one schedule."""

    unit: int  # seconds added per step
    field: int  # index into _Wall
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
def _plan(s: CronSchedule) -> _Plan:
    mods = tuple(h * 60 + m for h in _bits(s.hour) for m in _bits(s.minute))
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


def _fires_on(s: CronSchedule, day_number: int) -> bool:
    d = date.fromordinal(day_number + _EPOCH_ORDINAL)
    return bool(s.month >> d.month & 1) and _dom_dow_match(s, d.day, (day_number + 4) % 7)


def _spec_next(s: CronSchedule, z: _Zone, after: int) -> int | None:
    """robfig SpecSchedule.Next(after) in zone z: the first fire time > after, or None.

    Each ``continue`` is robfig's ``goto WRAP``. The month and day loops step the wall clock
    (AddDate) one unit at a time as robfig does; the hour, minute and second loops add absolute
    time and are jumped over in one go where no offset change lies in between.
    """
    plan = _plan(s)
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


def _next_month(s: CronSchedule, z: _Zone, t: int) -> tuple[int, _Wall]:
    """robfig's month loop: AddDate(0, 1, 0) until the month matches or a year starts."""
    while True:
        w = z.wall(t)
        t = z.date(w.year, w.month + 1, w.day, w.clock)
        w = z.wall(t)
        if w.month == 1 or s.month >> w.month & 1:
            return t, w


def _next_day(s: CronSchedule, z: _Zone, t: int) -> tuple[int, _Wall]:
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


def _advance(z: _Zone, t: int, loop: _Loop) -> tuple[int, _Wall]:
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
        return day * _DAY + self.plan.mods[k] * 60 - self.offset

    @property
    def last(self) -> int:
        return self._at(self.days[-1], self.last_k) if self.days else self.head

    def fires(self, since: int = -_FAR_FUTURE) -> Iterator[int]:
        """Fire times in order, from the first one >= since."""
        if self.head >= since:
            yield self.head
        n = len(self.plan.mods)
        first_day = bisect.bisect_left(self.days, (since + self.offset) // _DAY)
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


def _plain_block(s: CronSchedule, z: _Zone, fire: int, end: int) -> _Block:
    """``fire`` and the longest run of fires after it (< end) that the plain wall clock predicts.

    A Next call is plain when no offset change can influence it: none between its start and its
    result, and when it walks whole days (time.Date at midnights) none within a day of either.
    """
    plan = _plan(s)
    offset = z.offset(fire)
    day, second_of_day = divmod(fire + offset, _DAY)
    # robfig re-checks a field only after a wrap, so across a DST change it can fire at a time the
    # schedule does not name: on another day (Asia/Beirut changes at midnight) or in another hour
    # (a 30-minute change moves the hour without wrapping the minute). It moves on from there.
    k = plan.index.get(second_of_day // 60)
    if k is None or not _fires_on(s, day):
        return _Block(fire, plan, offset)
    before = z.prev_transition(fire, 2 * _DAY)
    after = z.next_transition(fire, _HORIZON)
    stop = min(end, fire + _HORIZON, end if after is None else after)
    n = len(plan.mods)

    def at(day: int, k: int) -> int:
        return day * _DAY + plan.mods[k] * 60 - offset

    start_k, last_k, days = k + 1, k, [day]
    while last_k + 1 < n and at(day, last_k + 1) < stop:
        last_k += 1
    if last_k == n - 1:
        if last_k == k:  # the head ends its day: plain fires start on a later day
            start_k, days = 0, []
        for candidate in range(day + 1, (stop + offset) // _DAY + 1):
            if not _fires_on(s, candidate):
                continue
            first = at(candidate, 0)
            previous_day = days[-1] if days else day
            walks_days = candidate != previous_day + 1
            if first >= stop or (
                walks_days
                and not (
                    (before is None or at(previous_day, n - 1) - _DAY > before)
                    and (after is None or first + _DAY < after)
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


def _blocks(s: CronSchedule, z: _Zone, after: int, end: int) -> Iterator[_Block]:
    """The robfig Next chain from ``after`` as plain blocks, each followed by one exact Next call.

    Stops after yielding the first block that starts at or after ``end``, or one that ``stalls``.
    """
    fire = _spec_next(s, z, after)
    while fire is not None:
        block = _plain_block(s, z, fire, end)
        following = _spec_next(s, z, block.last)
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


# --- public API ----------------------------------------------------------------------------------


def _unix(dt: datetime, what: str) -> int:
    if not isinstance(dt, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise TypeError(f"{what} must be timezone-aware, got naive {dt.isoformat()}")
    return (dt - _EPOCH) // timedelta(seconds=1)


def _zone_of(tz: ZoneInfo) -> _Zone:
    if not isinstance(tz, ZoneInfo):
        raise TypeError(f"tz must be a zoneinfo.ZoneInfo, not {type(tz).__name__}")
    return _zone(tz)


def _every_seconds(schedule: CronSchedule) -> int | None:
    return None if schedule.every is None else schedule.every // timedelta(seconds=1)


def next_fire_times(
    schedule: CronSchedule, tz: ZoneInfo, after: datetime, count: int
) -> list[datetime]:
    """The next ``count`` times (> after, aware, in tz) robfig's Next chain yields from ``after``.

    Fewer are returned when robfig's five-year search finds nothing more, or when Next stops
    advancing (a robfig bug after some historical DST changes, e.g. America/St_Johns at 00:01 in
    2008): the controller then runs neither that time nor any later one.
    """
    z, start = _zone_of(tz), _unix(after, "after")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    every = _every_seconds(schedule)
    if every is not None:  # ConstantDelaySchedule.Next: drop sub-seconds, add the delay
        return [datetime.fromtimestamp(start + every * i, tz) for i in range(1, count + 1)]
    times: list[datetime] = []
    if count == 0:
        return times
    for block in _blocks(schedule, z, start, _FAR_FUTURE):
        if block.stalls:
            break
        for t in block.fires():
            times.append(datetime.fromtimestamp(t, tz))
            if len(times) == count:
                return times
    return times


def _year_window(z: _Zone, year_start: datetime) -> tuple[int, int]:
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
    for block in _blocks(schedule, z, start - 1, end):
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


def _judged_until(s: CronSchedule, z: _Zone, start: int, end: int) -> int:
    """The year's end, or just past the first fire if the schedule skips the whole year."""
    first = _spec_next(s, z, start - 1)
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
    for block in _blocks(schedule, z, start - 1, end):
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
        a, b = max(lo, change - 2 * _DAY), change + 2 * _DAY
        if windows and a <= windows[-1][1]:
            windows[-1][1] = b
        else:
            windows.append([a, b])
    found: list[DstAnomaly] = []
    fired: list[int] = []  # fires in the current window, then the first one after it
    for block in _blocks(schedule, z, lo, hi + 3 * _DAY):
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
    day = a.local_date.toordinal() - _EPOCH_ORDINAL
    return day * 1440 + a.local_time.hour * 60 + a.local_time.minute


def _minute_key(z: _Zone, t: int) -> int:
    """Local wall-clock minutes since 1970-01-01 00:00."""
    return (t + z.offset(t)) // 60


def _window_anomalies(s: CronSchedule, z: _Zone, since: int, fired: list[int]) -> list[DstAnomaly]:
    """Compare the local times the schedule names with those robfig ran, after ``since`` and
    before the last of ``fired``."""
    key_from, key_to = _minute_key(z, since), _minute_key(z, fired[-1])
    runs: dict[int, list[int]] = {}
    for t in fired[:-1]:
        runs.setdefault(_minute_key(z, t), []).append(t)
    found: list[DstAnomaly] = []
    for day in range(key_from // 1440, key_to // 1440 + 1):
        if not _fires_on(s, day):
            continue
        for m in _plan(s).mods:
            key = day * 1440 + m
            if not key_from < key < key_to or len(runs.get(key, ())) == 1:
                continue
            d, clock = date.fromordinal(day + _EPOCH_ORDINAL), time(m // 60, m % 60)
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
