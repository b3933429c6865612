"""Which finished Jobs this process has dealt with."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class JobLedger:
    """Finished Jobs this process has dealt with (Jobs are TTL-deleted after some days, so the
    sets stay small: one UID per run). The Job event handler and a pass may meet on one
    Job: whoever claims it first does the work, the other skips it."""

    recorded: set[str] = field(default_factory=set)  # attempts recorded and counted
    notified: set[str] = field(default_factory=set)  # ... and notices queued
    _busy: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def claim(self, uid: str) -> Iterator[bool]:
        """True when the caller holds the Job until the block ends; False when it is done or
        someone else is at it."""
        with self._lock:
            mine = uid not in self.notified and uid not in self._busy
            if mine:
                self._busy.add(uid)
        try:
            yield mine
        finally:
            if mine:
                with self._lock:
                    self._busy.discard(uid)
