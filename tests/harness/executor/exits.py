"""The supervisor's wait: container exits (one pidfd per process) and wake-ups in one selector."""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class ExitSelector(Generic[T]):
    """Waits until a registered process exits or someone calls ``wake``.

    Only the supervisor thread calls ``wait`` and ``remove``: the selector belongs to it. Other
    threads ``add`` pidfds (queued, registered at the next ``wait``) and ``wake`` it.
    """

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._queued: list[tuple[int, T]] = []

    def add(self, pidfd: int, data: T) -> None:
        """Report ``data`` from ``wait`` once the process behind ``pidfd`` has exited."""
        with self._lock:
            self._queued.append((pidfd, data))

    def remove(self, pidfd: int) -> None:
        """Stop watching ``pidfd`` and close it."""
        self._selector.unregister(pidfd)
        os.close(pidfd)

    def wake(self) -> None:
        """End the current (or next) ``wait`` early; never blocks."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def wait(self, timeout: float) -> list[T]:
        """What ``add`` registered for processes that have exited; [] after a wake-up or
        ``timeout`` seconds."""
        with self._lock:
            fresh, self._queued = self._queued, []
        for pidfd, data in fresh:
            self._selector.register(pidfd, selectors.EVENT_READ, data)
        exited: list[T] = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                continue
            exited.append(key.data)
        return exited

    def close(self) -> None:
        """Release the selector and the wake-up pipe."""
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
