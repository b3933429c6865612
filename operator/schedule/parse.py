"""robfig/cron v3 ``ParseStandard`` plus the CronJob controller's own rules: a schedule
string into a ``CronSchedule`` (or a ``CronError`` naming the field and the rule)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta


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
    for month in values_of(s.month):
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


def values_of(mask: int) -> list[int]:
    return [v for v in range(mask.bit_length()) if mask >> v & 1]
