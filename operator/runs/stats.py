"""Each schedule's run statistics as last read from PostgreSQL, kept until a run of it changes.

Every reconcile needs them (status totals, the failure streak, the budget holds), and passes
come with every slot and event: at 1,000 schedules the ``run_stats`` query was a third of the
operator's idle work when a sweep passed over every schedule every minute. A schedule's rows
change only through this process -- the run API (start, progress, finish) and the recorder
(finished Jobs, orphaned pods, the reaper) -- and each of those calls ``invalidate`` for the
schedule's UID. A read that raced with a write is not kept (a generation per schedule), and an
entry lives at most ``ttl`` as a safety net: writes by another operator process (one replica
today, replaced with ``Recreate``) or by hand reach status within it, or at once with any change
to the schedule (its event invalidates too, but a resume: the first pass after a start reads
every schedule's at once, ``fill``); a finished Job's event invalidates in the process that
records it. Two replicas serving the run API (issue 15) will have to share invalidations (e.g.
PostgreSQL LISTEN/NOTIFY).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from nocturne_operator.storage import RunStats


@dataclass
class RunStatsCache:
    """Run statistics per schedule UID and query (``key``: what the reconcile asks for, e.g.
    the month and the moment failures are counted from)."""

    # Every write of a run in this process invalidates at once; the TTL only bounds how late a
    # row written elsewhere (by hand, a restore) reaches status. At 10 minutes an idle
    # operator with 1,000 schedules re-read 100 schedules' statistics a minute (issue 13).
    ttl: timedelta = timedelta(hours=1)
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, tuple[Hashable, RunStats, float]] = field(default_factory=dict)
    _generations: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, uid: str, key: Hashable, load: Callable[[], RunStats]) -> RunStats:
        """The schedule's statistics for ``key``: kept ones, or ``load()`` (which may raise;
        nothing is kept then)."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(uid)
            if entry is not None and entry[0] == key and now - entry[2] < self.ttl.total_seconds():
                return entry[1]
            generation = self._generations.get(uid, 0)
        stats = load()
        with self._lock:
            # Keep it only if no run of the schedule changed while it was read.
            if self._generations.get(uid, 0) == generation:
                self._entries[uid] = (key, stats, now)
        return stats

    def fill(
        self, keys: Mapping[str, Hashable], load: Callable[[], Mapping[str, RunStats]]
    ) -> None:
        """Keep many schedules' statistics read at once (``keys``: UID -> what ``get`` will
        ask for); as in ``get``, not those of a schedule a run of which changed meanwhile."""
        now = self.clock()
        with self._lock:
            generations = {uid: self._generations.get(uid, 0) for uid in keys}
        loaded = load()
        with self._lock:
            for uid, stats in loaded.items():
                if uid in keys and self._generations.get(uid, 0) == generations[uid]:
                    self._entries[uid] = (keys[uid], stats, now)

    def invalidate(self, uid: str) -> None:
        """A run of the schedule was written: read its statistics afresh next time."""
        with self._lock:
            self._entries.pop(uid, None)
            self._generations[uid] = self._generations.get(uid, 0) + 1

    def forget(self, uid: str) -> None:
        """The schedule is gone."""
        with self._lock:
            self._entries.pop(uid, None)
            self._generations.pop(uid, None)
