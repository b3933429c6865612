"""The operator's side of AgentSchedulePolicies against a real PostgreSQL: the namespace budgets
written for the grants (only for the namespaces this operator serves, idempotently), a policy's
status (written once, then left alone), and the schedules queued when a policy changes."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, cast

import pytest

from nocturne_operator.adapters.kube import Kube
from nocturne_operator.controller import policies
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.schedule.policy import Policy
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History, NamespaceBudgetRow

pytestmark = pytest.mark.integration

SPEC = {
    "namespaceSelector": {"matchLabels": {"team": "sre"}},
    "namespaceBudget": {"maxMonthlyUSD": "30", "timeZone": "Europe/Berlin"},
}


class Patches:
    """The one Kube call ``policy_status`` makes, recorded."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any], bool]] = []

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, status: bool = False
    ) -> dict[str, Any]:
        self.patches.append((kind, name, copy.deepcopy(patch), status))
        return {}


def indexes(
    namespaces: dict[str, dict[str, str]], found: list[Policy], schedules: list[tuple[str, str]]
) -> Indexes:
    empty: dict[Any, Any] = {}
    return Indexes(
        cast(Any, {key: ["packed"] for key in schedules}),
        cast(Any, empty),
        cast(Any, empty),
        cast(Any, empty),
        cast(Any, empty),
        cast(Any, {p.name: [p] for p in found}),
        cast(Any, {name: [labels] for name, labels in namespaces.items()}),
    )


@pytest.fixture
def memo(url: str) -> Iterator[Memo]:
    made = Memo(settings=Settings(), watch_patterns=("!solo-*",))
    made.kube = cast(Kube, Patches())
    with History.connect(url) as history:
        made.history = history
        yield made


def test_budgets_are_written_for_served_namespaces_only_and_once(memo: Memo) -> None:
    assert memo.history is not None
    memo.history.sync_namespace_budgets({"solo-x": NamespaceBudgetRow(Decimal(1), "UTC", "x")})
    found = indexes(
        {"sre": {"team": "sre"}, "solo-sre": {"team": "sre"}, "web": {"team": "web"}},
        [Policy.parse("sre", SPEC)],
        [],
    )
    assert policies.sync_budgets(memo, found)
    expected = {
        "sre": NamespaceBudgetRow(Decimal(30), "Europe/Berlin", "sre"),
        # Another operator's row (it serves solo-*) stays as it wrote it.
        "solo-x": NamespaceBudgetRow(Decimal(1), "UTC", "x"),
    }
    assert memo.history.namespace_budgets() == expected
    assert memo.history.sync_namespace_budgets(
        {"sre": NamespaceBudgetRow(Decimal(30), "Europe/Berlin", "sre")}, memo.serves
    ) == 0  # fmt: skip
    # The policy gone: its row goes, the other operator's stays.
    assert policies.sync_budgets(memo, indexes({"sre": {"team": "sre"}}, [], []))
    assert memo.history.namespace_budgets() == {"solo-x": expected["solo-x"]}


def test_a_policys_status_is_written_once_and_names_a_broken_field(memo: Memo) -> None:
    found = indexes({"sre": {"team": "sre"}, "web": {}}, [], [])
    body: dict[str, Any] = {"metadata": {"name": "sre", "generation": 2}, "spec": SPEC}
    patch = policies.policy_status(memo, found, body)
    assert patch["namespaces"] == 1
    assert patch["observedGeneration"] == 2
    [valid] = patch["conditions"]
    assert (valid["type"], valid["status"], valid["reason"]) == ("Valid", "True", "Valid")
    body["status"] = patch
    assert policies.policy_status(memo, found, body) == {}  # idempotent
    assert len(cast(Patches, memo.kube).patches) == 1
    broken = copy.deepcopy(body)
    broken["spec"]["namespaceBudget"]["timeZone"] = "Mars/Olympus"
    patch = policies.policy_status(memo, found, broken)
    [invalid] = patch["conditions"]
    assert (invalid["status"], invalid["reason"]) == ("False", "Invalid")
    assert 'spec.namespaceBudget.timeZone "Mars/Olympus"' in invalid["message"]


def test_a_policy_change_queues_every_schedule_and_a_namespace_change_its_own(
    memo: Memo,
) -> None:
    """A selector moved from one namespace to another changes both: every schedule is looked
    at again (what a policy selected before its change is not known)."""
    policy = Policy.parse("sre", SPEC)
    found = indexes(
        {"sre": {"team": "sre"}, "web": {}}, [policy], [("sre", "check"), ("web", "news")]
    )
    policies.queue_all(memo, found)
    assert {memo.queue.get(timeout=0), memo.queue.get(timeout=0)} == {
        ("sre", "check"),
        ("web", "news"),
    }
    for key in (("sre", "check"), ("web", "news")):
        memo.queue.done(key)
    policies.queue_namespace(memo, found, "web")
    assert memo.queue.get(timeout=0) == ("web", "news")
    assert memo.queue.get(timeout=0) is None


def test_a_broken_policy_leaves_its_namespaces_no_budget_at_all(memo: Memo) -> None:
    """Its cap cannot be read, so nothing is granted there until it is fixed (its schedules
    are held too): a limit is never dropped because its policy broke."""
    assert memo.history is not None
    broken = Policy.parse(
        "sre", {**SPEC, "namespaceBudget": {"maxMonthlyUSD": "30", "timeZone": "Europe/Berln"}}
    )
    per_run = Policy.parse(
        "web",
        {"namespaceSelector": {"matchLabels": {"team": "web"}}, "limits": {"maxPerRunUSD": "3"}},
    )
    found = indexes({"sre": {"team": "sre"}, "web": {"team": "web"}}, [broken, per_run], [])
    assert policies.sync_budgets(memo, found)
    assert memo.history.namespace_budgets() == {
        "sre": NamespaceBudgetRow(Decimal(0), "UTC", "sre"),
        "web": NamespaceBudgetRow(None, "UTC", None, Decimal(3), "web"),
    }
