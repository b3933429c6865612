"""The agentruns API's selectors and continue tokens (issue 17): Kubernetes' grammar over the
labels every AgentRun has, field selectors with a start range, and a clear 400 for anything
else -- never a crash on what a client sends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent_runner.contract import RunOutcome
from nocturne_operator.runsapi.selectors import (
    SelectorError,
    decode_continue,
    encode_continue,
    select,
)


def test_equality_and_set_requirements_narrow_the_filter() -> None:
    chosen = select(
        "team-a",
        "nocturne.dev/schedule=digest,nocturne.dev/result in (Failed, TimedOut)",
        "",
    )
    assert not chosen.empty
    assert chosen.filter.namespace == "team-a"
    assert chosen.filter.schedule == "digest"
    assert set(chosen.filter.statuses or ()) == {RunOutcome.FAILED, RunOutcome.TIMED_OUT}
    negated = select("team-a", "nocturne.dev/result!=Succeeded,nocturne.dev/job notin (a,b)", "")
    assert set(negated.filter.not_statuses) == {RunOutcome.SUCCEEDED}
    assert set(negated.filter.not_jobs) == {"a", "b"}


@pytest.mark.parametrize(
    ("labels", "empty"),
    [
        ("team=red", True),  # a label no AgentRun has: nothing matches
        ("team!=red", False),  # ... and its negation matches everything
        ("!team", False),
        ("team", True),
        ("nocturne.dev/schedule", False),  # every AgentRun has its three labels
        ("!nocturne.dev/schedule", True),
        ("nocturne.dev/schedule=a,nocturne.dev/schedule=b", True),  # contradictory
        ("nocturne.dev/result in (Failed),nocturne.dev/result=Succeeded", True),
    ],
)
def test_labels_decide_as_kubernetes_does(labels: str, empty: bool) -> None:
    assert select("ns", labels, "").empty is empty


def test_fields_name_a_run_and_a_start_range() -> None:
    chosen = select(
        None,
        "",
        "metadata.name=digest-42,metadata.namespace=team-a,"
        "status.startedAfter=2026-11-01T00:00:00Z,status.startedBefore=2026-12-01T00:00:00+09:00",
    )
    assert (chosen.filter.schedule, chosen.filter.run_id) == ("digest", 42)
    assert chosen.filter.namespace == "team-a"
    assert chosen.filter.started_after == datetime(2026, 11, 1, tzinfo=UTC)
    assert chosen.filter.started_before == datetime(2026, 11, 30, 15, tzinfo=UTC)
    assert select("team-a", "", "metadata.namespace=team-b").empty
    assert select("team-a", "", "metadata.name=no-number").empty


def test_repeated_field_requirements_all_hold() -> None:
    assert select(None, "", "metadata.namespace=a,metadata.namespace=b").empty
    assert select("ns", "", "metadata.name=s-1,metadata.name=s-2").empty
    assert not select("ns", "", "metadata.name=s-1,metadata.name=s-1").empty
    both = select(
        "ns",
        "",
        "status.startedAfter=2026-11-01T00:00:00Z,status.startedAfter=2026-11-05T00:00:00Z,"
        "status.startedBefore=2026-12-01T00:00:00Z,status.startedBefore=2026-11-20T00:00:00Z",
    )
    assert both.filter.started_after == datetime(2026, 11, 5, tzinfo=UTC)
    assert both.filter.started_before == datetime(2026, 11, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("labels", "fields", "says"),
    [
        ("", "status.cost=1", 'field label not supported: "status.cost"'),
        ("", "status.startedAfter=yesterday", "not an RFC 3339 time"),
        ("", "status.startedAfter=2026-11-01T00:00:00", "with a zone"),
        ("", "status.startedAfter!=2026-11-01T00:00:00Z", "takes '=' only"),
        ("", "spec.schedule", "not a field requirement"),
        ("nocturne.dev/result=Done", "", "'Done' is not a result"),
        ("nocturne.dev/schedule in (a,b)", "", "at most one value for schedule"),
        ("a=(b", "", "not a label requirement"),
        ("!a in (b)", "", "'!' goes only before a bare key"),
        ("x" * 5000, "", "longer than 4096 characters"),
    ],
)
def test_bad_selectors_are_a_clear_error_naming_the_requirement(
    labels: str, fields: str, says: str
) -> None:
    with pytest.raises(SelectorError, match=r".*") as caught:
        select("ns", labels, fields)
    assert says in str(caught.value)


def test_continue_tokens_round_trip_and_refuse_anything_else() -> None:
    started = datetime(2026, 12, 3, 9, 0, 0, 123456, tzinfo=UTC)
    assert decode_continue(encode_continue(started, 77)) == (started, 77)
    for token in ("", "%%%", "e30", "x" * 300, encode_continue(started, 0)):
        with pytest.raises(SelectorError, match="not a continue token"):
            decode_continue(token)
