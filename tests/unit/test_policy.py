"""AgentSchedulePolicy: its fields refuse bad values with the field named, label selectors select
as Kubernetes' do, each limit comes from the right policy (priority, then the stricter value),
schedules are validated against their namespace's limits with the deciding policy named, and a
spent namespace budget holds every schedule until the month turns in the budget's zone."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_runner.contract import USD_PER_RUN_PATTERN
from nocturne_operator.api import conditions as cond
from nocturne_operator.api.model import _SECRET_NAME_PATTERN
from nocturne_operator.api.policy import (
    _LABEL_KEY,
    _LABEL_VALUE,
    _MODEL,
    NAMESPACE_BUDGET_PATTERN,
    AgentSchedulePolicySpec,
    LabelSelector,
)
from nocturne_operator.schedule.policy import Policy, limits_for
from nocturne_operator.schedule.validation import Limits, NamespaceCap, Peer, validate
from nocturne_operator.settings import Settings
from unit.test_crd import model_tree, schema_tree
from unit.test_reconcile_rails import Cluster, schedule, stats
from unit.test_validation import NOW
from unit.test_validation import schedule as research_schedule

SETTINGS = Settings()
CRD_FILE = Path(__file__).parents[2] / "crds" / "agentschedulepolicies.nocturne.dev.yaml"
OPS = {"team": "ops", "kubernetes.io/metadata.name": "ops"}
RESEARCH = {"team": "research", "kubernetes.io/metadata.name": "research"}


def policy(name: str = "ops", **spec: Any) -> Policy:
    body: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"team": "ops"}}}
    body.update(spec)
    return Policy.parse(name, body)


def everywhere(name: str = "default", **spec: Any) -> Policy:
    return policy(name, namespaceSelector={}, **spec)


# ---- the model ---------------------------------------------------------------------------------


def test_the_crd_and_the_model_have_the_same_fields_and_defaults() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["spec"]["scope"] == "Cluster"
    [version] = doc["spec"]["versions"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    from_crd = schema_tree(spec_schema)
    from_model = model_tree(AgentSchedulePolicySpec)
    # An array's items are a schema of their own (schema_tree stops at arrays).
    terms = "spec.namespaceSelector.matchExpressions."
    items = spec_schema["properties"]["namespaceSelector"]["properties"]["matchExpressions"]
    assert sorted(schema_tree(items["items"], terms.rstrip("."))) == sorted(
        k for k in from_model if k.startswith(terms)
    )
    from_model = {k: v for k, v in from_model.items() if not k.startswith(terms)}
    assert sorted(from_crd) == sorted(from_model)
    assert from_crd["spec.priority"] == from_model["spec.priority"] == 0
    assert from_crd["spec.namespaceBudget.timeZone"] == from_model["spec.namespaceBudget.timeZone"]
    # One pattern each, in the CRD and the model (a namespace's cap fits NUMERIC(14, 6)).
    props = spec_schema["properties"]
    assert props["namespaceBudget"]["properties"]["maxMonthlyUSD"]["pattern"] == (
        NAMESPACE_BUDGET_PATTERN
    )
    assert props["limits"]["properties"]["maxPerRunUSD"]["pattern"] == USD_PER_RUN_PATTERN
    # What the model refuses, the apiserver refuses too (with the webhook off or down).
    selector = props["namespaceSelector"]["properties"]
    term = selector["matchExpressions"]["items"]["properties"]
    allow = props["allow"]["properties"]
    assert selector["matchLabels"]["additionalProperties"]["pattern"] == _LABEL_VALUE
    assert term["key"]["pattern"] == _LABEL_KEY
    assert term["values"]["items"]["pattern"] == _LABEL_VALUE
    assert allow["models"]["items"]["pattern"] == _MODEL
    for secrets in ("llmSecrets", "webhookSecrets"):
        assert allow[secrets]["items"]["pattern"] == _SECRET_NAME_PATTERN
    chart_copy = Path(__file__).parents[2] / "helm" / "nocturne" / "crds" / CRD_FILE.name
    assert chart_copy.read_text() == CRD_FILE.read_text()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"namespaceSelector": None}, "spec.namespaceSelector"),
        ({"priority": 5000}, "spec.priority: Input should be less than or equal to 1000"),
        ({"priority": "1"}, "spec.priority: Input should be a valid integer"),
        ({"limits": {"minIntervalMinutes": 0}}, "spec.limits.minIntervalMinutes"),
        ({"limits": {"maxPerRunUSD": 2.5}}, 'must be a decimal string such as "2.00"'),
        ({"limits": {"maxPerRunUSD": "0"}}, "must be greater than 0"),
        ({"limits": {"maxPerRunUSD": "-1"}}, "must be a non-negative decimal string"),
        ({"limits": {"maxSchedules": -1}}, "spec.limits.maxSchedules"),
        ({"limits": {"maxInterval": 5}}, "spec.limits.maxInterval: Extra inputs"),
        ({"namespaceBudget": {}}, "spec.namespaceBudget.maxMonthlyUSD: Field required"),
        ({"namespaceBudget": {"maxMonthlyUSD": "1e3"}}, "spec.namespaceBudget.maxMonthlyUSD"),
        # NUMERIC(14, 6) in namespace_budgets: 100 million USD does not fit.
        ({"namespaceBudget": {"maxMonthlyUSD": "100000000"}}, "spec.namespaceBudget.maxMonthlyUSD"),
        (
            {"namespaceBudget": {"maxMonthlyUSD": "10", "timeZone": "Mars/Olympus"}},
            'spec.namespaceBudget.timeZone "Mars/Olympus": not an IANA time zone name',
        ),
        ({"allow": {"providers": ["gemini"]}}, "spec.allow.providers[0]"),
        ({"allow": {"models": ["gpt 4"]}}, "'gpt 4' is not a model name or glob"),
        ({"allow": {"llmSecrets": ["Bad_Name"]}}, "'Bad_Name' is not a Secret name"),
        ({"allow": {"webhookSecrets": ["a", "a"]}}, "must not list an entry twice"),
        (
            {"allow": {"llmBaseURLs": ["ftp://models.internal"]}},
            'spec.allow.llmBaseURLs[0] "ftp://models.internal"',
        ),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}},
            "operator In needs at least one value",
        ),
        (
            {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "t", "operator": "Exists", "values": ["x"]}]
                }
            },
            "operator Exists takes no values",
        ),
        (
            {"namespaceSelector": {"matchExpressions": [{"key": "t", "operator": "Gt"}]}},
            "spec.namespaceSelector.matchExpressions[0].operator",
        ),
        ({"namespaceSelector": {"matchLabels": {"-bad": "x"}}}, "'-bad' is not a label key"),
        ({"namespaceSelector": {"matchLabels": {"team": "a b"}}}, "is not a label value"),
    ],
)
def test_a_bad_policy_names_the_field_and_the_rule(spec: dict[str, Any], expected: str) -> None:
    body: dict[str, Any] = {"namespaceSelector": {}}
    body.update(spec)
    parsed = Policy.parse("p", body)
    assert parsed.spec is None
    assert any(expected in error for error in parsed.errors), parsed.errors


def test_a_spec_that_is_no_mapping_is_an_error_not_a_crash() -> None:
    for spec in (None, "x", [1], 3):
        assert Policy.parse("p", spec).errors


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ({}, {"ops", "research", "bare"}),
        ({"matchLabels": {"team": "ops"}}, {"ops"}),
        ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["ops"]}]}, {"ops"}),
        (
            {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["ops"]}]},
            {"research", "bare"},
        ),
        ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, {"ops", "research"}),
        ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}, {"bare"}),
        (
            {
                "matchLabels": {"team": "ops"},
                "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["ops"]}],
            },
            set(),
        ),
    ],
)
def test_selectors_select_as_kubernetes_does(selector: dict[str, Any], selected: set[str]) -> None:
    namespaces = {"ops": OPS, "research": RESEARCH, "bare": {}}
    parsed = LabelSelector.model_validate(selector)
    assert {n for n, labels in namespaces.items() if parsed.matches(labels)} == selected


# ---- which policy decides ---------------------------------------------------------------------


def test_without_policies_the_cluster_settings_decide() -> None:
    assert limits_for(SETTINGS, [], OPS) == Limits.of(SETTINGS)
    assert limits_for(SETTINGS, [policy(limits={"minIntervalMinutes": 5})], RESEARCH) == (
        Limits.of(SETTINGS)
    )


def test_the_highest_priority_setting_a_limit_decides_it_and_unset_limits_fall_through() -> None:
    default = everywhere(limits={"minIntervalMinutes": 120, "maxPerRunUSD": "1"})
    ops = policy(priority=10, limits={"minIntervalMinutes": 5})
    limits = limits_for(SETTINGS, [default, ops], OPS)
    assert (limits.min_interval_minutes, limits.min_interval_by) == (
        5,
        ' (AgentSchedulePolicy "ops")',
    )
    assert (limits.max_per_run_usd, limits.max_per_run_by) == (
        Decimal(1),
        ' (AgentSchedulePolicy "default")',
    )
    assert (limits.max_schedules, limits.max_schedules_by) == (50, "")
    elsewhere = limits_for(SETTINGS, [default, ops], RESEARCH)
    assert (elsewhere.min_interval_minutes, elsewhere.min_interval_by) == (
        120,
        ' (AgentSchedulePolicy "default")',
    )


def test_at_equal_priority_the_stricter_value_wins() -> None:
    a = everywhere("a", limits={"minIntervalMinutes": 30, "maxSchedules": 9})
    b = policy("b", limits={"minIntervalMinutes": 10, "maxSchedules": 3, "maxPerRunUSD": "4"})
    limits = limits_for(SETTINGS, [a, b], OPS)
    assert (limits.min_interval_minutes, limits.min_interval_by) == (
        30,
        ' (AgentSchedulePolicy "a")',
    )
    assert (limits.max_schedules, limits.max_schedules_by) == (3, ' (AgentSchedulePolicy "b")')
    # Relaxing above the cluster's default is a policy's right (10 USD is the default).
    relaxed = limits_for(SETTINGS, [policy(limits={"maxPerRunUSD": "25"})], OPS)
    assert relaxed.max_per_run_usd == Decimal(25)


def test_allow_lists_replace_the_clusters_and_equal_priorities_each_have_their_say() -> None:
    a = everywhere("a", allow={"llmSecrets": ["ops-key", "shared"], "models": ["gpt-4o*"]})
    b = policy("b", allow={"llmSecrets": ["shared"]})
    limits = limits_for(SETTINGS, [a, b], OPS)
    assert [(x.entries, x.source) for x in limits.llm_secrets] == [
        (("ops-key", "shared"), ' (AgentSchedulePolicy "a")'),
        (("shared",), ' (AgentSchedulePolicy "b")'),
    ]
    assert limits.webhook_secrets == Limits.of(SETTINGS).webhook_secrets
    assert [x.entries for x in limits.models] == [("gpt-4o*",)]


def test_the_smallest_namespace_budget_of_the_top_priority_applies() -> None:
    a = everywhere("a", namespaceBudget={"maxMonthlyUSD": "50"})
    b = policy("b", namespaceBudget={"maxMonthlyUSD": "30", "timeZone": "Asia/Tokyo"})
    assert limits_for(SETTINGS, [a, b], OPS).namespace_budget == NamespaceCap(
        Decimal(30), "Asia/Tokyo", "b"
    )
    assert limits_for(SETTINGS, [a, b], RESEARCH).namespace_budget == NamespaceCap(
        Decimal(50), "UTC", "a"
    )


def test_a_broken_policy_holds_the_schedules_of_the_namespaces_it_selects() -> None:
    broken = policy(namespaceBudget={"maxMonthlyUSD": "10", "timeZone": "Mars/Olympus"})
    assert broken.spec is None
    limits = limits_for(SETTINGS, [broken], OPS)
    assert len(limits.broken) == 1
    assert 'AgentSchedulePolicy "ops" selects this namespace but is invalid' in limits.broken[0]
    assert limits.broken_policies == ("ops",)
    assert "Mars/Olympus" in limits.broken[0]
    result = validate(research_schedule(), SETTINGS, now=NOW, limits=limits)
    assert not result.ok
    assert str(result.errors[0]).startswith('metadata.namespace: AgentSchedulePolicy "ops"')
    # Its selector is readable: other namespaces are not held.
    assert limits_for(SETTINGS, [broken], RESEARCH) == Limits.of(SETTINGS)
    # A policy whose selector itself is broken selects nothing.
    lost = Policy.parse("lost", {"namespaceSelector": {"matchLabels": {"-x": "y"}}})
    assert lost.selector is None
    assert limits_for(SETTINGS, [lost], OPS) == Limits.of(SETTINGS)


# ---- validation against a namespace's limits ---------------------------------------------------


def five_minutes(**spec: Any) -> dict[str, Any]:
    body = research_schedule(schedule="*/5 * * * *", timeZone="UTC", **spec)
    body["metadata"]["namespace"] = "ops"
    return body


def errors(body: dict[str, Any], limits: Limits) -> list[str]:
    return [str(e) for e in validate(body, SETTINGS, now=NOW, limits=limits).errors]


def test_a_five_minute_schedule_runs_where_a_policy_allows_it_and_is_refused_elsewhere() -> None:
    default = everywhere(limits={"minIntervalMinutes": 60})
    ops = policy(priority=10, limits={"minIntervalMinutes": 5})
    assert errors(five_minutes(), limits_for(SETTINGS, [default, ops], OPS)) == []
    assert errors(five_minutes(), limits_for(SETTINGS, [default, ops], RESEARCH)) == [
        'spec.schedule "*/5 * * * *": runs as often as every 5 min (in UTC), minimum interval '
        'is 60 min (AgentSchedulePolicy "default")'
    ]
    # The cluster's own minimum names no policy (the message people know).
    assert errors(five_minutes(), Limits.of(SETTINGS)) == [
        'spec.schedule "*/5 * * * *": runs as often as every 5 min (in UTC), minimum interval '
        "is 60 min"
    ]


def test_each_policy_limit_is_named_in_the_error_it_causes() -> None:
    strict = policy(
        limits={"maxPerRunUSD": "0.50"},
        allow={
            "providers": ["anthropic"],
            "models": ["claude-*"],
            "llmSecrets": ["ops-key"],
            "llmBaseURLs": ["https://llm.internal/v1"],
            "webhookSecrets": ["pager"],
        },
    )
    body = research_schedule(
        notifications={"webhookSecretRef": {"name": "slack", "key": "url"}, "events": ["Failed"]}
    )
    body["spec"]["agent"]["baseURL"] = "https://api.openai.com/v1"
    by = ' (AgentSchedulePolicy "ops")'
    assert errors(body, limits_for(SETTINGS, [strict], OPS)) == [
        f'spec.budget.maxPerRunUSD "2.00": exceeds the namespace\'s cap of 0.5 USD per run{by}',
        f'spec.agent.provider "openai": not a provider this namespace may use (allowed: '
        f"anthropic){by}",
        f'spec.agent.model "gpt-4o-mini": not a model this namespace may use (allowed: '
        f"claude-*){by}",
        'spec.agent.apiKeySecretRef.name "llm-credentials": not a Secret the cluster admin '
        f"allows for LLM keys (allowed: ops-key){by}",
        'spec.agent.baseURL "https://api.openai.com/v1": not in the allowed endpoints '
        f"(https://llm.internal/v1){by}",
        'spec.notifications.webhookSecretRef.name "slack": not a Secret the cluster admin '
        f"allows for webhooks (allowed: pager){by}",
    ]


def test_the_quota_comes_from_the_policy_and_zero_allows_none() -> None:
    peers = [Peer("daily-ai-news", "2026-11-01T00:00:00Z")]
    closed = limits_for(SETTINGS, [policy(limits={"maxSchedules": 0})], OPS)
    result = validate(five_minutes(), SETTINGS, now=NOW, peers=peers, limits=closed)
    [error] = [str(e) for e in result.errors if "quota" in str(e)]
    assert error.endswith(
        "quota exceeded: at most 0 AgentSchedules per namespace (1 exist; the oldest 0 run) "
        '(AgentSchedulePolicy "ops")'
    )


# ---- the namespace's monthly budget on status --------------------------------------------------


def test_a_spent_namespace_budget_holds_the_schedule_until_the_month_turns_in_its_zone() -> None:
    cluster = Cluster(schedule())
    cluster.limits = limits_for(
        SETTINGS,
        [everywhere("team", namespaceBudget={"maxMonthlyUSD": "30", "timeZone": "UTC"})],
        RESEARCH,
    )
    cluster.namespace_spent = Decimal("29.99")
    assert cluster.reconcile(stats("1.00")) == cond.PHASE_ACTIVE
    cluster.namespace_spent = Decimal("30.00")
    assert cluster.reconcile(stats("1.00")) == cond.PHASE_BUDGET_EXHAUSTED
    held = cluster.condition(cond.BUDGET_EXHAUSTED)
    assert held["reason"] == cond.NAMESPACE_BUDGET_REACHED
    assert held["message"] == (
        "namespace research spent 30.00 USD in 2026-11 (UTC), reaching its maxMonthlyUSD "
        '30.00 (AgentSchedulePolicy "team"); resumes automatically at 2026-12-01 00:00 UTC '
        "(+00:00)"
    )
    assert cluster.cronjob_suspended
    assert cluster.seen.notices[-1] == (
        "BudgetExceeded",
        "namespace:2026-11:30.00",
        held["message"],
    )
    # Idempotent: the same pass again changes nothing and notifies nobody twice.
    before = copy.deepcopy(cluster.status)
    notices = len(cluster.seen.notices)
    cluster.reconcile(stats("1.00"))
    assert cluster.status == before
    assert len(cluster.seen.notices) == notices
    # The database away: this month's hold stays.
    cluster.namespace_spent = None
    assert cluster.reconcile(stats("1.00")) == cond.PHASE_BUDGET_EXHAUSTED
    # The month turns in UTC (not in the schedule's Tokyo): runs resume by themselves.
    december = datetime(2026, 12, 1, 0, 0, 30, tzinfo=UTC)
    plan = cluster.plan(stats("0"), now=datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    assert plan.due is not None
    assert plan.due <= datetime(2026, 12, 1, tzinfo=UTC)
    cluster.namespace_spent = Decimal(0)
    assert cluster.reconcile(stats("0"), now=december) == cond.PHASE_ACTIVE
    assert not cluster.cronjob_suspended


def test_a_database_outage_in_a_new_month_does_not_keep_last_months_namespace_hold() -> None:
    cluster = Cluster(schedule())
    cluster.limits = limits_for(
        SETTINGS, [everywhere("team", namespaceBudget={"maxMonthlyUSD": "30"})], RESEARCH
    )
    cluster.namespace_spent = Decimal(31)
    assert cluster.reconcile(stats("1.00")) == cond.PHASE_BUDGET_EXHAUSTED
    cluster.namespace_spent = None
    december = datetime(2026, 12, 1, 0, 0, 30, tzinfo=UTC)
    assert cluster.reconcile(stats("0"), now=december) == cond.PHASE_ACTIVE
