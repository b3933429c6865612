"""Threads released together, for the tests that race reservations on their own connections."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_once(count: int, job: Callable[[int], T]) -> list[T]:
    """``job(0)`` ... ``job(count - 1)``, each on its own thread, all released by one barrier;
    their results (in the order they finished). The first error any of them raised is raised."""
    barrier = threading.Barrier(count)
    results: list[T] = []
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait()
            results.append(job(n))
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
