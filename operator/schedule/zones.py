"""Time zones with Go's arithmetic: wall clocks, offsets and transitions located to the
second, cached per chunk of Unix time (what ``time.Date`` normalisation needs)."""

from __future__ import annotations

import bisect
import functools
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

DAY = 86_400
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_ORDINAL = EPOCH.date().toordinal()
_CHUNK_BITS = 22  # offsets are cached per ~48.5-day chunk of Unix time
# tzdata has no two offset changes closer than ~96 h since 1900 (168 h since 1970), so sampling
# once a day finds every transition; each one is then located to the second by bisection.
_SAMPLE = DAY
HORIZON = 400 * DAY  # how far a calm stretch is extended before re-checking
FAR_FUTURE = 253_402_300_799  # 9999-12-31T23:59:59Z, the end of datetime's range


class Wall(NamedTuple):
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


class Zone:
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

    def wall(self, x: int) -> Wall:
        days, secs = divmod(x + self.offset(x), DAY)
        d = date.fromordinal(days + EPOCH_ORDINAL)
        return Wall(
            d.year, d.month, d.day, secs // 3600, secs // 60 % 60, secs % 60, (days + 4) % 7
        )

    def date(self, year: int, month: int, day: int = 1, clock: int = 0) -> int:
        """Go's time.Date (``clock`` in seconds after midnight): out-of-range parts carry over,
        and local times in a gap or an overlap resolve the way Go resolves them."""
        year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
        days = date(year, month, 1).toordinal() - EPOCH_ORDINAL + day - 1
        local = days * DAY + clock
        # Go looks the offset up at the local time read as UTC, then once more at the result.
        return local - self.offset(local - self.offset(local))


@functools.lru_cache(maxsize=32)
def cached_zone(tz: ZoneInfo) -> Zone:
    return Zone(tz)
