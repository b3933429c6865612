"""Threads released together, for the tests that race reservations on their own connections."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import TypeVar

import sqlalchemy as sa

from nocturne_operator.storage import History

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


def warm_histories(url: str, count: int, stack: ExitStack) -> list[History]:
    """``count`` repositories on ``url``, each with its connection open and used once, so that
    connecting does not stagger the threads ``at_once`` releases (closed with ``stack``)."""
    histories = [stack.enter_context(History.connect(url)) for _ in range(count)]
    for history in histories:
        with history.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    return histories
