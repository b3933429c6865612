"""Each schedule's run statistics as last read from PostgreSQL, kept until a run of it changes.

Every reconcile needs them (status totals, the failure streak, the budget holds), and passes
come with every slot and event: at 1,000 schedules the ``run_stats`` query was a third of the
operator's idle work when a sweep passed over every schedule every minute. A schedule's rows
change only through the operator -- the run API of any replica (start, progress, finish) and
the leader's recorder (finished Jobs, orphaned pods, the reaper) -- and each of those calls
``invalidate`` for the schedule's UID; the run API's writes reach every replica's cache through
``controller.relay`` (LISTEN/NOTIFY), and a replica taking the lead starts from an empty cache.
A read that raced with a write is not kept (a generation per schedule), and an entry lives at
most ``ttl`` as a safety net: writes by hand reach status within it, or at once with any change
to the schedule (its event invalidates too, but a resume: the first pass after a start reads
every schedule's at once, ``fill``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from nocturne_operator.storage import RunStats, StatsQuery

Load = Callable[[list[StatsQuery]], Mapping[str, RunStats]]
"""One read of many schedules' statistics -> {UID: statistics} (``History.run_stats``);
may raise."""


@dataclass
class _Batch:
    """Schedules whose statistics one read fetches for the passes waiting on it."""

    queries: dict[str, StatsQuery] = field(default_factory=dict)  # by UID
    done: bool = False
    results: Mapping[str, RunStats] = field(default_factory=dict)
    error: BaseException | None = None


@dataclass
class RunStatsCache:
    """Run statistics per schedule UID, for the query last asked (the month, and the moment
    failures are counted from).

    Misses are read in batches, one read at a time: while one read is in flight, the passes
    that miss meanwhile join the next batch, which one of them reads when the first is done.
    During a burst (1,000 schedules created at once, eight workers) that is one read of a few
    schedules instead of a read of each; alone, a miss is read at once."""

    # Every write of a run in this process invalidates at once; the TTL only bounds how late a
    # row written elsewhere (by hand, a restore) reaches status. At 10 minutes an idle
    # operator with 1,000 schedules re-read 100 schedules' statistics a minute (issue 13).
    ttl: timedelta = timedelta(hours=1)
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, tuple[StatsQuery, RunStats, float]] = field(default_factory=dict)
    _generations: dict[str, int] = field(default_factory=dict)
    _next: _Batch | None = None  # the batch misses join now
    _reading: bool = False  # a batch is being read
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def get(self, query: StatsQuery, load: Load) -> RunStats:
        """The answer to ``query``: kept, or read by ``load`` in a batch with other misses (a
        failed read raises its error in every pass that waited on it; nothing is kept then)."""
        now = self.clock()
        uid = query.schedule_uid
        with self._cond:
            entry = self._entries.get(uid)
            ttl = self.ttl.total_seconds()
            if entry is not None and entry[0] == query and now - entry[2] < ttl:
                return entry[1]
            batch = self._next = self._next or _Batch()
            batch.queries[uid] = query
            while not batch.done:
                if not self._reading and self._next is batch:
                    self._next, self._reading = None, True
                    break  # this pass reads the batch
                self._cond.wait()
            else:
                return self._result(batch, uid)
            generations = {u: self._generations.get(u, 0) for u in batch.queries}
        try:
            results, error = load(list(batch.queries.values())), None
        except BaseException as exc:  # raised below, in this pass and every waiting one
            results, error = {}, exc
        with self._cond:
            # Keep each only if no run of the schedule changed while it was read.
            for u, stats in results.items():
                if u in generations and self._generations.get(u, 0) == generations[u]:
                    self._entries[u] = (batch.queries[u], stats, now)
            batch.results, batch.error, batch.done = results, error, True
            self._reading = False
            self._cond.notify_all()
            return self._result(batch, uid)

    @staticmethod
    def _result(batch: _Batch, uid: str) -> RunStats:
        if batch.error is not None:
            raise batch.error
        return batch.results[uid]

    def fill(self, queries: list[StatsQuery], load: Load) -> None:
        """Keep many schedules' statistics read at once (each query what ``get`` will ask);
        as in ``get``, not those of a schedule a run of which changed meanwhile."""
        now = self.clock()
        asked = {q.schedule_uid: q for q in queries}
        with self._cond:
            generations = {uid: self._generations.get(uid, 0) for uid in asked}
        loaded = load(queries)
        with self._cond:
            for uid, stats in loaded.items():
                if uid in asked and self._generations.get(uid, 0) == generations[uid]:
                    self._entries[uid] = (asked[uid], stats, now)

    def invalidate(self, uid: str) -> None:
        """A run of the schedule was written: read its statistics afresh next time."""
        with self._cond:
            self._entries.pop(uid, None)
            self._generations[uid] = self._generations.get(uid, 0) + 1

    def clear(self) -> None:
        """Read every schedule's statistics afresh (this replica just took the lead, or may
        have missed another replica's writes)."""
        with self._cond:
            for uid in self._entries:
                self._generations[uid] = self._generations.get(uid, 0) + 1
            self._entries.clear()

    def forget(self, uid: str) -> None:
        """The schedule is gone."""
        with self._cond:
            self._entries.pop(uid, None)
            self._generations.pop(uid, None)
