"""Conditions keep lastTransitionTime unless their status flips; phase derives from them."""

from __future__ import annotations

from datetime import UTC, datetime

from nocturne_operator.api import conditions as c

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)


def test_transition_time_changes_only_on_a_flip() -> None:
    first = c.merge([], [c.condition(c.READY, True, c.RECONCILED, "ok", 1)], T0)
    again = c.merge(first, [c.condition(c.READY, True, c.RECONCILED, "still ok", 2)], T1)
    assert again[0]["lastTransitionTime"] == "2026-11-26T12:00:00Z"
    assert again[0]["message"] == "still ok"
    assert again[0]["observedGeneration"] == 2
    flipped = c.merge(again, [c.condition(c.READY, False, c.INVALID_SPEC, "bad", 3)], T1)
    assert flipped[0]["lastTransitionTime"] == "2026-11-26T13:00:00Z"


def test_merge_is_idempotent_and_ordered() -> None:
    desired = [
        c.condition(c.SCHEDULE_WARNING, False, c.NO_DST_ISSUES, "", 1),
        c.condition(c.SUSPENDED, False, c.NOT_SUSPENDED, "", 1),
        c.condition(c.READY, True, c.RECONCILED, "ok", 1),
    ]
    once = c.merge([], desired, T0)
    assert [x["type"] for x in once] == [c.READY, c.SUSPENDED, c.SCHEDULE_WARNING]
    assert c.merge(once, desired, T1) == once


def test_phase_is_derived() -> None:
    assert c.phase([]) == c.PHASE_PENDING
    ready = c.merge([], [c.condition(c.READY, True, c.RECONCILED, "", 1)], T0)
    assert c.phase(ready) == c.PHASE_ACTIVE
    paused = c.merge(ready, [c.condition(c.SUSPENDED, True, c.SUSPENDED_BY_USER, "", 1)], T0)
    assert c.phase(paused) == c.PHASE_SUSPENDED
    invalid = c.merge(paused, [c.condition(c.READY, False, c.INVALID_SPEC, "", 1)], T0)
    assert c.phase(invalid) == c.PHASE_INVALID
