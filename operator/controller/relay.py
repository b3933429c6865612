"""What one replica's run API hears, every replica hears (issue 15): a runner's reports reach
whichever replica the Service picks, and the leader writes status.

The run API writes each report to PostgreSQL first (the history is shared already); what stayed
in the process that served it was the run in flight (``ActiveRuns``, ``status.activeRun``) and
the invalidation of the schedule's cached run statistics (``RunStatsCache``). ``RunRelay`` is
the run API's observer and write hook: it publishes each change with ``pg_notify`` on the
installation's channel (``channel_for``: one per Lease, so two installations sharing a database
do not hear each other; no table, no migration: a NOTIFY is delivered to every listening
session in commit order, and a report's row is already committed when its change is sent), and
one ``LISTEN`` connection per replica applies every change -- its own too -- to its
``ActiveRuns`` and its statistics cache. The standby keeps both as current as the leader's.

A change carries the whole entry (a snapshot), not a delta: a notification missed while a
listener reconnects is made good by the run's next report (progress comes every few seconds),
and every cached statistic is dropped when the listener is back. A change that cannot be sent
(the database away) is retried a few times and then dropped with a warning: the report itself
is in the history, and the leader's passes read the statistics afresh after their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from agent_runner.contract import FinishReport, Grant, ProgressReport
from nocturne_operator.controller.active import ActiveRun, ActiveRuns, Key
from nocturne_operator.runapi.auth import RunIdentity
from nocturne_operator.runs.stats import RunStatsCache

__all__ = ["RunRelay", "channel_for", "decode", "encode", "run_document", "run_of"]

log = logging.getLogger(__name__)


def channel_for(namespace: str, lease: str) -> str:
    """The NOTIFY channel of the replicas that share the Lease ``namespace/lease``."""
    digest = hashlib.blake2b(f"{namespace}/{lease}".encode(), digest_size=8).hexdigest()
    return f"nocturne_run_reports_{digest}"


_PENDING = 10_000  # changes waiting to be sent; past that the oldest are dropped
_SEND_TRIES = 3


def encode(change: dict[str, Any]) -> str:
    """A change as its NOTIFY payload (well under PostgreSQL's 8,000 bytes: an activity is at
    most 120 characters)."""
    return json.dumps(change, separators=(",", ":"))


def run_document(run: ActiveRun) -> dict[str, Any]:
    return {
        "job": run.job,
        "jobUID": run.job_uid,
        "attempt": run.attempt,
        "startedAt": run.started_at.isoformat(),
        "step": run.step,
        "maxSteps": run.max_steps,
        "cost": str(run.cost),
        "budget": str(run.budget),
        "spentBefore": str(run.spent_before),
        "activity": run.activity,
        "updatedAt": run.updated_at.isoformat(),
        "expiresAt": run.expires_at.isoformat(),
    }


def run_of(doc: dict[str, Any]) -> ActiveRun:
    return ActiveRun(
        job=str(doc["job"]),
        job_uid=str(doc["jobUID"]),
        attempt=int(doc["attempt"]),
        started_at=datetime.fromisoformat(doc["startedAt"]),
        step=int(doc["step"]),
        max_steps=int(doc["maxSteps"]),
        cost=Decimal(doc["cost"]),
        budget=Decimal(doc["budget"]),
        spent_before=Decimal(doc["spentBefore"]),
        activity=None if doc.get("activity") is None else str(doc["activity"]),
        updated_at=datetime.fromisoformat(doc["updatedAt"]),
        expires_at=datetime.fromisoformat(doc["expiresAt"]),
    )


def decode(payload: str) -> dict[str, Any]:
    """A payload as a change; ValueError when it is not one."""
    change = json.loads(payload)
    if not isinstance(change, dict) or change.get("op") not in ("put", "end", "wrote"):
        raise ValueError(f"not a run report change: {payload[:80]!r}")
    return change


class RunRelay:
    """The run API's ``RunObserver`` and ``on_write`` hook when there is a database."""

    def __init__(
        self,
        active: ActiveRuns,
        stats: RunStatsCache,
        conninfo: str,
        channel: str,
        *,
        reconnect_seconds: float = 2.0,
    ) -> None:
        self.active, self.stats, self.conninfo = active, stats, conninfo
        self.channel = channel
        self.reconnect_seconds = reconnect_seconds
        self.listening = asyncio.Event()
        self._pending: asyncio.Queue[str] = asyncio.Queue(_PENDING)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Send and listen in the background (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._listen())]

    async def stop(self) -> None:
        """Stop both after the changes waiting are sent (at most a few seconds)."""
        if self._tasks and not self._pending.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending.join(), 3.0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._drop_connection()

    # ---- the run API's side (sync, on the event loop) --------------------------------------

    def started(self, identity: RunIdentity, grant: Grant) -> None:
        key, run = self.active.on_start(identity, grant)
        self._publish(
            {
                "op": "put",
                "key": key,
                "uid": identity.schedule_uid,
                "run": run_document(run),
                "in": 0,
            }
        )

    def progressed(self, identity: RunIdentity, report: ProgressReport) -> None:
        update = self.active.on_progress(identity, report)
        if update is not None:
            key, run = update
            self._publish(
                {
                    "op": "put",
                    "key": key,
                    "uid": identity.schedule_uid,
                    "run": run_document(run),
                    "in": self.active.refresh,
                }
            )

    def finished(self, identity: RunIdentity, report: FinishReport) -> None:
        del report
        key = (identity.namespace, identity.schedule)
        self._publish(
            {"op": "end", "key": key, "uid": identity.schedule_uid, "job": identity.job_uid}
        )

    def wrote(self, schedule_uid: str) -> None:
        """A run of the schedule was written: here at once, elsewhere when the change arrives."""
        self.stats.invalidate(schedule_uid)
        self._publish({"op": "wrote", "uid": schedule_uid})

    def _publish(self, change: dict[str, Any]) -> None:
        payload = encode(change)
        loop = self._loop
        if loop is None:  # not started (a test of the run API alone): apply here only
            self.apply(change)
            return
        loop.call_soon_threadsafe(self._enqueue, payload)

    def _enqueue(self, payload: str) -> None:
        if self._pending.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._pending.get_nowait()
                self._pending.task_done()
            log.warning("run report relay: %d changes waiting; the oldest dropped", _PENDING)
        self._pending.put_nowait(payload)

    # ---- every replica's side ----------------------------------------------------------------

    def apply(self, change: dict[str, Any]) -> None:
        """One change, as every replica applies it."""
        uid = str(change.get("uid") or "")
        if uid:
            self.stats.invalidate(uid)
        op = change["op"]
        if op == "wrote":
            return
        namespace, name = change["key"]
        key: Key = (str(namespace), str(name))
        if op == "put":
            self.active.put(key, run_of(change["run"]), float(change.get("in") or 0))
        elif op == "end":
            self.active.end(key, str(change["job"]))

    async def _send(self) -> None:
        while True:
            payload = await self._pending.get()
            try:
                for attempt in range(1, _SEND_TRIES + 1):
                    try:
                        await self._notify(payload)
                        break
                    except (psycopg.Error, OSError) as exc:
                        await self._drop_connection()
                        if attempt == _SEND_TRIES:
                            log.warning("run report relay: a change was not sent: %s", exc)
                        else:
                            await asyncio.sleep(self.reconnect_seconds)
            finally:
                self._pending.task_done()

    _sender: psycopg.AsyncConnection[Any] | None = None

    async def _notify(self, payload: str) -> None:
        if self._sender is None or self._sender.closed:
            self._sender = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=5
            )
        await self._sender.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    async def _drop_connection(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            with contextlib.suppress(Exception):
                await sender.close()

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    # Invalidations may have been missed while nobody listened.
                    self.stats.clear()
                    self.listening.set()
                    log.info("run report relay: listening")
                    async for notice in conn.notifies():
                        self._receive(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening.is_set():
                    log.warning(
                        "run report relay: listener lost (%s); reconnecting", type(exc).__name__
                    )
            self.listening.clear()
            await asyncio.sleep(self.reconnect_seconds)

    def _receive(self, payload: str) -> None:
        try:
            self.apply(decode(payload))
        except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
            log.warning("run report relay: an unreadable change ignored: %s", exc)
