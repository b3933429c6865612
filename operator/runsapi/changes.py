"""Run changes for watches: one ``LISTEN nocturne_runs`` connection per process wakes every
watcher when a run is written (a trigger NOTIFYs each insert and update, migration 0009), so
watches cost a query when something changed, not a poll per client. While the listener is down
(the database away, a restart of it), watchers are woken every ``fallback_seconds`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from nocturne_operator.storage.schema import RUNS_CHANNEL

__all__ = ["RunChanges"]

log = logging.getLogger(__name__)


class RunChanges:
    """The latest revision any NOTIFY carried, and a way to wait for a later one."""

    def __init__(self, conninfo: str | None, *, fallback_seconds: float = 5.0) -> None:
        self.conninfo = conninfo
        self.fallback_seconds = fallback_seconds
        self.latest = 0
        self.listening = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Listen in the background (no-op without a database)."""
        if self.conninfo is not None and self._task is None:
            self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait(self, seen: int, timeout: float) -> None:
        """Until a revision later than ``seen`` was announced, at most ``timeout`` seconds (at
        most ``fallback_seconds`` while nothing is listening)."""
        if self.latest > seen:
            return
        bound = timeout if self.listening else min(timeout, self.fallback_seconds)
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), bound)

    def _announce(self, revision: int) -> None:
        self.latest = max(self.latest, revision)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _listen(self) -> None:
        conninfo = self.conninfo
        if conninfo is None:
            return
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {RUNS_CHANNEL}")
                    self.listening = True
                    log.info("agentruns API: listening for run changes")
                    async for notice in conn.notifies():
                        _, _, revision = notice.payload.partition(" ")
                        self._announce(int(revision) if revision.isdigit() else self.latest)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening:
                    log.warning(
                        "agentruns API: run changes listener lost (%s); watchers poll every "
                        "%.0f s until it is back",
                        type(exc).__name__,
                        self.fallback_seconds,
                    )
            self.listening = False
            self._announce(self.latest)  # watchers re-read once
            await asyncio.sleep(self.fallback_seconds)
