"""The run report relay through a real PostgreSQL (issue 15): what one replica's run API hears
reaches every replica of the installation, in order, and no other installation."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from nocturne_operator.controller.active import ActiveRuns
from nocturne_operator.controller.relay import RunRelay, channel_for
from nocturne_operator.runs.stats import RunStatsCache
from nocturne_operator.storage import History
from unit.test_active_runs import KEY, finish, grant, identity, progress

pytestmark = pytest.mark.integration


def conninfo(history: History) -> str:
    return history.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


async def until(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
        await asyncio.sleep(0.02)


def test_every_replica_hears_every_report_and_other_installations_none(
    history: History,
) -> None:
    async def scenario() -> None:
        ours, theirs = channel_for("ops", "nocturne-operator"), channel_for("ops", "other")
        assert ours != theirs
        replicas = [
            RunRelay(ActiveRuns(), RunStatsCache(), conninfo(history), channel)
            for channel in (ours, ours, theirs)
        ]
        for relay in replicas:
            await relay.start()
        try:
            await until(lambda: all(r.listening.is_set() for r in replicas))
            leader, standby, foreign = replicas
            who = identity()
            # The standby's run API grants; the leader shows the run.
            standby.started(who, grant())
            await until(lambda: leader.active.of(KEY))
            for step in range(1, 6):  # in order: the last report wins everywhere
                standby.progressed(who, progress(who, f"0.0{step}", step, f"step {step}"))
            await until(lambda: leader.active.of(KEY)[0].step == 5)
            assert leader.active.of(KEY)[0].cost == Decimal("0.05")
            assert standby.active.of(KEY) == leader.active.of(KEY)
            leader.finished(who, finish(who))
            await until(lambda: not standby.active.of(KEY) and not leader.active.of(KEY))
            await asyncio.sleep(0.2)
            assert foreign.active.of(KEY) == []
        finally:
            for relay in replicas:
                await relay.stop()

    asyncio.run(scenario())


def test_a_change_sent_while_the_database_is_away_is_dropped_not_raised(history: History) -> None:
    async def scenario() -> None:
        relay = RunRelay(
            ActiveRuns(),
            RunStatsCache(),
            "postgresql://nobody@127.0.0.1:9/none",
            "c",
            reconnect_seconds=0.01,
        )
        await relay.start()
        try:
            relay.wrote("uid-digest")  # the local cache is invalidated all the same
            await asyncio.wait_for(relay._pending.join(), 10)
        finally:
            await relay.stop()

    asyncio.run(scenario())
    del history
