"""Retry timing: Retry-After in both forms, backoff with jitter, bounded waits."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from agent_runner.providers.retry import (
    RetryPolicy,
    backoff_delay,
    may_have_been_processed,
    parse_retry_after,
    retry_delay,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": " 0 "}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "Thu, 26 Nov 2026 12:00:30 GMT"}, 30.0),
        ({"Retry-After": "Thu, 26 Nov 2026 11:00:00 GMT"}, 0.0),  # in the past
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # OpenAI's finer header wins
        ({"retry-after-ms": "soon", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def test_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(7)  # noqa: S311 - seeded, reproducible
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (9, 8.0)]:
        for _ in range(50):
            delay = backoff_delay(attempt, policy, rng)
            assert ceiling / 2 <= delay <= ceiling


def test_retry_delay_honours_retry_after_up_to_a_limit() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0, max_retry_after=60)
    rng = random.Random(1)  # noqa: S311 - seeded, reproducible
    assert retry_delay(1, policy, rng, None) is not None
    assert retry_delay(1, policy, rng, 5.0) == 5.0
    assert retry_delay(1, policy, rng, 61.0) is None
    small = retry_delay(3, policy, rng, 0.01)
    assert small is not None
    assert small >= 0.2  # backoff still applies when the server asks for less


@pytest.mark.parametrize(
    ("status", "retry_after", "maybe"),
    [
        (502, None, True),
        (504, None, True),
        (504, 2.0, True),  # a gateway's Retry-After says nothing about the upstream's generation
        (500, None, True),
        (503, None, True),  # e.g. a proxy's "upstream reset before headers"
        (503, 1.0, False),  # load shedding before processing
        (429, None, False),
        (429, 5.0, False),
        (529, None, False),
        (408, None, False),
        (409, None, False),
    ],
)
def test_which_answers_may_follow_a_billed_generation(
    status: int, retry_after: float | None, maybe: bool
) -> None:
    assert may_have_been_processed(status, retry_after) is maybe
