"""The workers: threads that take schedules off the queue and reconcile them, one schedule per
worker at a time. A pass that fails comes back after its backoff; an apiserver that is away
(a restart, an outage) is logged in one line a minute, not a traceback per schedule.

Only the leading replica reconciles (issue 15): on a standby the workers wait (``pause``) while
the queue keeps what events name; ``resume`` when this replica takes the lead. A pass that
loses the lead midway is refused its next write (``NotLeadingError``) and dropped: the new
leader passes over every schedule when it takes over."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nocturne_operator.adapters.kube import NotLeadingError
from nocturne_operator.controller.queue import Key, WorkQueue

log = logging.getLogger(__name__)

# How often an apiserver outage is logged again while passes keep failing for it.
AWAY_LOG_INTERVAL = 60.0


def apiserver_away(exc: BaseException) -> bool:
    """The apiserver cannot be reached or is not serving (a restart, an outage): transient."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 502, 503, 504) or exc.status is None
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


@dataclass
class FirstPass:
    """The schedules kopf listed when the operator started, until each was reconciled once:
    then the operator is back in step, and says so in its log with the time it took."""

    started: float = field(default_factory=time.monotonic)
    # What it follows: the process's start, or this replica taking the lead (issue 15).
    after: str = "start"
    _left: set[Key] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, keys: set[Key]) -> bool:
        """The initial listing's keys; False when a first pass was already begun."""
        with self._lock:
            if self._left is not None:
                return False
            self._left = set(keys)
            done = not self._left
        if done:
            self._done()
        return True

    def running(self) -> bool:
        """Begun and not yet done."""
        with self._lock:
            return bool(self._left)

    def handled(self, key: Key) -> None:
        with self._lock:
            if not self._left or key not in self._left:
                return
            self._left.discard(key)
            done = not self._left
        if done:
            self._done()

    def _done(self) -> None:
        log.info(
            "first pass done: every schedule listed at %s reconciled, %.1f s after it",
            self.after,
            time.monotonic() - self.started,
        )


@dataclass
class Workers:
    """``count`` threads running ``handle`` on keys from ``queue`` until it shuts down."""

    queue: WorkQueue
    handle: Callable[[Key], None]
    count: int
    first_pass: FirstPass = field(default_factory=FirstPass)
    _threads: list[threading.Thread] = field(default_factory=list)
    _away_logged: float = float("-inf")
    _away_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Set while this replica leads (and at shutdown, to let waiting workers end).
    _leading: threading.Event = field(default_factory=threading.Event)
    _stopping: bool = False

    def resume(self) -> None:
        """This replica leads: take schedules off the queue."""
        self._leading.set()

    def pause(self) -> None:
        """This replica no longer leads: take no schedule off the queue (passes in progress
        are refused their next write)."""
        self._leading.clear()

    def start(self, *, paused: bool = False) -> None:
        """Start the threads; ``paused``: they wait for ``resume`` (a replica standing by)."""
        if not paused:
            self._leading.set()
        for number in range(self.count):
            thread = threading.Thread(target=self._run, name=f"reconcile-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the queue down and wait for passes in progress (up to ``timeout`` in all)."""
        self.queue.shut_down()
        self._stopping = True
        self._leading.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def _run(self) -> None:
        while self._leading.wait() and (key := self.queue.get()) is not None:
            if not self._leading.is_set() and not self._stopping:
                self.queue.done(key)
                self.queue.add(key)  # kept for when this replica leads again
                continue
            try:
                self.handle(key)
            except NotLeadingError as exc:
                log.info("reconcile of %s/%s stopped: %s", *key, exc)
            except Exception as exc:
                delay = self.queue.retry(key)
                self._failed(key, exc, delay)
            else:
                self.queue.succeeded(key)
            finally:
                self.queue.done(key)
                self.first_pass.handled(key)

    def _failed(self, key: Key, exc: Exception, delay: float) -> None:
        if not apiserver_away(exc):
            log.exception("reconcile of %s/%s failed; retrying in %.0f s", *key, delay)
            return
        now = time.monotonic()
        with self._lock:
            self._away_failures += 1
            if now - self._away_logged < AWAY_LOG_INTERVAL:
                return
            self._away_logged, failures, self._away_failures = now, self._away_failures, 0
        log.warning(
            "apiserver unavailable (%s) at %s/%s: %d pass(es) failed for it since the last "
            "such line; each is retried with backoff",
            exc,
            *key,
            failures,
        )
