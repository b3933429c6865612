"""The admission webhook's decision (issue 15): the operator's own validation, at apply time;
an update that leaves the spec alone always passes; the namespace quota counts the new one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import kopf
import pytest

from nocturne_operator.controller.admission import check, check_policy, serves
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.prices import load_price_table
from nocturne_operator.schedule.validation import Peer
from nocturne_operator.settings import Settings

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def body(name: str = "digest", schedule: str = "0 9 * * *") -> dict[str, Any]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name, "namespace": "research"},
        "spec": {
            "schedule": schedule,
            "task": {"query": "digest"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "0.10"},
        },
    }


def memo(peers: list[Peer] | None = None, **settings: Any) -> Memo:
    made = Memo(settings=Settings(**settings))
    made.prices = load_price_table()
    made.kube = cast(Any, None)  # no apiserver: a namespace's labels come from the index only
    if peers is not None:
        empty: dict[Any, Any] = {}
        made.indexes = Indexes(
            cast(Any, empty), cast(Any, {"research": peers}), cast(Any, empty),
            cast(Any, empty), cast(Any, empty), cast(Any, empty), cast(Any, empty),
        )  # fmt: skip
    return made


def test_a_valid_schedule_is_admitted_and_an_invalid_one_refused_naming_the_rule() -> None:
    assert check(body(), None, memo(), operation="CREATE", now=NOW) == []
    with pytest.raises(kopf.AdmissionError) as refused:
        check(body(schedule="*/5 * * * *"), None, memo(), operation="CREATE", now=NOW)
    assert 'spec.schedule "*/5 * * * *"' in str(refused.value)
    assert "minimum interval is 60 min" in str(refused.value)
    assert refused.value.code == 422


def test_an_update_that_leaves_the_spec_alone_always_passes() -> None:
    invalid = body(schedule="*/5 * * * *")
    annotated = {**invalid, "metadata": {**invalid["metadata"], "annotations": {"a": "b"}}}
    assert check(annotated, invalid, memo(), operation="UPDATE", now=NOW) == []
    with pytest.raises(kopf.AdmissionError):
        check(invalid, body(), memo(), operation="UPDATE", now=NOW)  # the spec changed


def test_the_quota_counts_the_schedule_being_created() -> None:
    full = [Peer(f"s{i}", f"2026-11-0{i + 1}T00:00:00Z") for i in range(2)]
    settings = {"max_schedules_per_namespace": 2}
    with pytest.raises(kopf.AdmissionError, match="quota"):
        check(body("third"), None, memo(full, **settings), operation="CREATE", now=NOW)
    # An existing one, updated, is not counted twice.
    assert check(body("s1"), None, memo(full, **settings), operation="UPDATE", now=NOW) == []


def test_a_bad_failure_policy_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="webhook_failure_policy"):
        Settings(webhook_failure_policy="Sometimes")


@pytest.mark.parametrize(
    ("namespace", "patterns", "served"),
    [
        ("team-a", [], True),
        ("team-a", ["team-a", "team-b"], True),
        ("team-c", ["team-a", "team-b"], False),
        ("chart-x", ["!chart-*,!solo-*"], False),
        ("research", ["!chart-*,!solo-*"], True),
    ],
)
def test_only_the_namespaces_this_operator_serves_are_checked(
    namespace: str, patterns: list[str], served: bool
) -> None:
    assert serves(namespace, patterns) is served


def test_a_broken_policy_is_refused_by_name_and_field_but_its_labels_may_change() -> None:
    good: dict[str, Any] = {
        "metadata": {"name": "sre"},
        "spec": {"namespaceSelector": {}, "namespaceBudget": {"maxMonthlyUSD": "30"}},
    }
    check_policy(good)
    budget = {"maxMonthlyUSD": "30", "timeZone": "Nowhere"}
    broken = {
        "metadata": {"name": "sre", "labels": {"owner": "platform"}},
        "spec": {"namespaceSelector": {}, "namespaceBudget": budget},
    }
    with pytest.raises(kopf.AdmissionError) as refused:
        check_policy(broken)
    assert 'spec.namespaceBudget.timeZone "Nowhere": not an IANA time zone name' in str(
        refused.value
    )
    assert refused.value.code == 422
    # Already in (the webhook was off): relabelling it is not refused, fixing it is accepted.
    check_policy(broken, {**broken, "metadata": {"name": "sre"}}, operation="UPDATE")
    check_policy(good, broken, operation="UPDATE")
