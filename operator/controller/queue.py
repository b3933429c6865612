"""The schedules waiting to be reconciled, the shape of client-go's workqueue: a schedule
waits at most once however many events name it, one worker at a time handles it, and one that
failed comes back after a delay that doubles with each failure in a row.

Every trigger (a change of the schedule, an event of its CronJob or of a finished Job, a
restart's initial listing, the moment a pass said the schedule is due again) only adds the
schedule's key; the workers do the reconciling. Each key has at most one timer: the last
``add_after`` for it (a pass's "come back at", or a failure's backoff) replaces the one before.
A burst of events for one schedule -- its creation, the CronJob it got, the status written back
-- costs one or two passes instead of one per event, and a schedule's passes never overlap (the
key is not handed out again while a worker holds it; added meanwhile, it waits until the worker
is done)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Key = tuple[str, str]  # (namespace, name)


@dataclass
class WorkQueue:
    """Thread-safe: handlers add from kopf's executor and the event loop, workers take from
    their own threads."""

    # The first retry of a failed pass, then doubled for each failure in a row, up to the cap.
    base_delay: float = 15.0
    max_delay: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _order: deque[Key] = field(default_factory=deque)  # what events named: served first
    _periodic: deque[Key] = field(default_factory=deque)  # timers that came due: behind events
    _waiting: set[Key] = field(default_factory=set)
    _held: set[Key] = field(default_factory=set)
    _again: set[Key] = field(default_factory=set)  # added while held
    # Each key's timer (its due time on the monotonic clock), and a heap of (due, seq, key)
    # in which an entry counts only while it is still its key's timer.
    _timers: dict[Key, float] = field(default_factory=dict)
    _later: list[tuple[float, int, Key]] = field(default_factory=list)
    _failures: dict[Key, int] = field(default_factory=dict)
    _closed: bool = False
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, key: Key) -> None:
        """Reconcile ``key`` as soon as a worker is free (once, however often it is added),
        ahead of keys whose timer came due."""
        with self._cond:
            self._add(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Add ``key`` once ``delay`` seconds have passed, behind what events named (1,000
        schedules due at the same minute do not hold up one just created). This becomes the
        key's only timer: an earlier ``add_after`` for it no longer counts."""
        with self._cond:
            due = self.clock() + max(0.0, delay)
            self._timers[key] = due
            heapq.heappush(self._later, (due, next(self._seq), key))
            if len(self._later) > 2 * len(self._timers) + 64:  # mostly replaced timers
                self._later = [(d, next(self._seq), k) for k, d in self._timers.items()]
                heapq.heapify(self._later)
            self._cond.notify()

    def add_within(self, key: Key, delay: float) -> None:
        """Add ``key`` within ``delay`` seconds: like ``add_after``, unless its timer is due
        sooner already (then nothing changes). Reports that come faster than ``delay`` cost one
        pass per ``delay``, not one each, and never postpone the pass they asked for."""
        with self._cond:
            due = self._timers.get(key)
            if due is not None and due <= self.clock() + max(0.0, delay):
                return
        self.add_after(key, delay)

    def get(self, timeout: float | None = None) -> Key | None:
        """The next key to reconcile, now held by the caller until ``done``; None when the
        queue is shut down (or nothing came within ``timeout``)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                self._promote_due()
                if self._closed:
                    return None
                if self._order or self._periodic:
                    key = (self._order or self._periodic).popleft()
                    self._waiting.discard(key)
                    self._held.add(key)
                    return key
                wait = self._wait(deadline)
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)

    def done(self, key: Key) -> None:
        """The worker holding ``key`` is finished with it; added meanwhile, it waits again."""
        with self._cond:
            self._held.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._add(key)

    def succeeded(self, key: Key) -> None:
        """A pass of ``key`` went through: its next failure starts from the first delay."""
        with self._cond:
            self._failures.pop(key, None)

    def retry(self, key: Key) -> float:
        """A pass of ``key`` failed: add it again after its backoff; returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            delay = min(self.max_delay, self.base_delay * 2.0 ** min(failures, 32))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """``key`` is gone (its schedule was deleted): drop its failure count and its timer."""
        with self._cond:
            self._failures.pop(key, None)
            self._timers.pop(key, None)

    def shut_down(self) -> None:
        """Wake every worker; ``get`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        """Keys waiting now (not counting held or delayed ones)."""
        with self._cond:
            return len(self._order) + len(self._periodic)

    def idle(self) -> bool:
        """Nothing waits and no worker holds a key (delayed retries may still be pending)."""
        with self._cond:
            return not self._order and not self._periodic and not self._held

    def _add(self, key: Key, *, periodic: bool = False) -> None:
        if key in self._held:
            self._again.add(key)
        elif key not in self._waiting:
            self._waiting.add(key)
            (self._periodic if periodic else self._order).append(key)
            self._cond.notify()
        elif not periodic and key in self._periodic:  # an event moves it ahead of the timers
            self._periodic.remove(key)
            self._order.append(key)

    def _promote_due(self) -> None:
        now = self.clock()
        while self._later and self._later[0][0] <= now:
            due, _, key = heapq.heappop(self._later)
            if self._timers.get(key) == due:  # not replaced since
                del self._timers[key]
                self._add(key, periodic=True)

    def _wait(self, deadline: float | None) -> float | None:
        """How long ``get`` may sleep: until the next delayed key or the deadline."""
        now = self.clock()
        due = self._later[0][0] if self._later else None
        candidates = [t - now for t in (due, deadline) if t is not None]
        return min(candidates) if candidates else None
