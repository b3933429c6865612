"""The sweep tells an apiserver that is away from a failing reconcile."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nocturne_operator.controller import sweep
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.controller.sweep import apiserver_away


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=0, reason="connection refused"),
        urllib3.exceptions.MaxRetryError(None, "/apis", reason=None),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted."),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
)
def test_an_apiserver_that_is_away_is_transient(exc: BaseException) -> None:
    assert apiserver_away(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=404, reason="Not Found"),
        ApiException(status=422, reason="Unprocessable Entity"),
        ApiException(status=500, reason="Internal Server Error"),
        KeyError("metadata"),
        ValueError("bad"),
    ],
)
def test_other_failures_are_not(exc: BaseException) -> None:
    assert not apiserver_away(exc)


def test_one_slow_schedule_does_not_end_the_pass_an_outage_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    away = ApiException(status=504, reason="Gateway Timeout")

    def periodic(schedule: dict[str, Any], *_: Any) -> None:
        name = schedule["metadata"]["name"]
        seen.append(name)
        if name in failing:
            raise away

    monkeypatch.setattr(sweep, "_periodic", periodic)
    names = [f"s{i}" for i in range(8)]
    bodies = {("ns", n): [{"metadata": {"name": n}}] for n in names}
    indexes = Indexes(bodies, {}, {}, {})  # type: ignore[arg-type]
    memo = cast(Memo, object())

    failing = {"s1", "s4"}  # a slow schedule now and then: every schedule gets its pass
    asyncio.run(sweep._reconcile_all(memo, indexes))
    assert seen == names

    seen.clear()
    failing = {"s2", "s3", "s4", "s5"}  # the apiserver went away: the pass ends after three
    asyncio.run(sweep._reconcile_all(memo, indexes))
    assert seen == ["s0", "s1", "s2", "s3", "s4"]
