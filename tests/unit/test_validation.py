"""Bad input gets a clear error naming the field, the value and the rule; good input passes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import yaml

from nocturne_operator.schedule.validation import Peer, _timing, validate
from nocturne_operator.settings import Settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SETTINGS = Settings()


def schedule(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": "daily-ai-news", "namespace": "research"},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "Asia/Tokyo",
            "task": {"query": "Generate a daily news digest about AI"},
            "agent": {
                "model": "gpt-4o-mini",
                "provider": "openai",
                "apiKeySecretRef": {"name": "llm-credentials", "key": "OPENAI_API_KEY"},
                "tools": ["web_fetch"],
            },
            "budget": {"maxPerRunUSD": "2.00", "maxTotalUSD": "60.00"},
        },
    }
    base["spec"].update(spec)
    return base


def with_path(path: str, value: Any) -> dict[str, Any]:
    """The valid schedule with one field (dotted path under spec) replaced; DELETE removes it."""
    obj = copy.deepcopy(schedule())
    node = obj["spec"]
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return obj


DELETE = object()


def errors_of(obj: Any, settings: Settings = SETTINGS, **kwargs: Any) -> list[str]:
    """The messages of validate()'s errors; ``kwargs`` go to validate() (e.g. ``prices``)."""
    return [str(e) for e in validate(obj, settings, now=NOW, **kwargs).errors]


def test_the_design_example_is_valid() -> None:
    result = validate(schedule(), SETTINGS, now=NOW)
    assert result.errors == []
    assert result.ok
    assert result.spec is not None
    assert result.spec.budget.max_per_run_usd == Decimal("2.00")
    assert result.spec.timeout_seconds == 600
    assert result.spec.retries == 2
    assert result.spec.concurrency_policy == "Forbid"


# (path under spec, bad value, the exact error line)
BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("schedule", DELETE, "spec.schedule: required"),
    ("schedule", 5, "spec.schedule 5: must be of type string"),
    ("schedule", "", 'spec.schedule "": String should have at least 1 character'),
    (
        "schedule",
        "x" * 129,
        'spec.schedule "' + "x" * 76 + "...: String should have at most 128 characters",
    ),
    (
        "timeZone",
        "Mars/Olympus_Mons",
        'spec.timeZone "Mars/Olympus_Mons": not an IANA time zone name (e.g. Asia/Tokyo)',
    ),
    ("timeZone", "Local", 'spec.timeZone "Local": not an IANA time zone name (e.g. Asia/Tokyo)'),
    ("timeZone", "", 'spec.timeZone "": String should have at least 1 character'),
    (
        "timeZone",
        "../etc/passwd",
        "spec.timeZone \"../etc/passwd\": String should match pattern '^[A-Za-z][A-Za-z0-9_+\\-]*(/[A-Za-z0-9_+\\-]+)*$'",
    ),
    (
        "suspend",
        "maybe",
        'spec.suspend "maybe": must be of type boolean',
    ),
    ("task", DELETE, "spec.task: required"),
    ("task.query", DELETE, "spec.task.query: required"),
    ("task.query", "", 'spec.task.query "": String should have at least 1 character'),
    ("task.query", "   ", 'spec.task.query "   ": must not be blank'),
    ("task.context", "text", 'spec.task.context "text": must be of type object'),
    (
        "task.stateKey",
        "Not OK!",
        "spec.task.stateKey \"Not OK!\": String should match pattern '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$'",
    ),
    ("task.extra", 1, "spec.task.extra: unknown field"),
    ("agent", DELETE, "spec.agent: required"),
    ("agent.model", DELETE, "spec.agent.model: required"),
    ("agent.model", "", 'spec.agent.model "": String should have at least 1 character'),
    (
        "agent.model",
        "gpt 4",
        "spec.agent.model \"gpt 4\": String should match pattern '^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$'",
    ),
    (
        "agent.provider",
        "cohere",
        "spec.agent.provider \"cohere\": Input should be 'openai', 'anthropic' or 'offline'",
    ),
    (
        "agent.baseURL",
        "ftp://models.local",
        'spec.agent.baseURL "ftp://models.local": must be an http(s) URL',
    ),
    (
        "agent.baseURL",
        "http://a b",
        'spec.agent.baseURL "http://a b": must be an http(s) URL without spaces',
    ),
    (
        "agent.apiKeySecretRef",
        DELETE,
        "spec.agent: apiKeySecretRef is required for provider 'openai' (only the offline provider needs no key)",
    ),
    (
        "agent.apiKeySecretRef.name",
        "Bad_Name",
        "spec.agent.apiKeySecretRef.name \"Bad_Name\": String should match pattern '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'",
    ),
    (
        "agent.apiKeySecretRef.key",
        "",
        'spec.agent.apiKeySecretRef.key "": String should have at least 1 character',
    ),
    ("agent.apiKeySecretRef.value", "sk-123", "spec.agent.apiKeySecretRef.value: unknown field"),
    (
        "agent.tools",
        ["shell"],
        "spec.agent.tools[0] \"shell\": Input should be 'web_fetch', 'send_email', 'purchase', 'delete_data' or 'change_permissions'",
    ),
    (
        "agent.tools",
        ["web_fetch", "web_fetch"],
        'spec.agent.tools ["web_fetch", "web_fetch"]: must not list an entry twice',
    ),
    (
        "agent.tools",
        ["web_fetch", "send_email"],
        'spec.agent.tools ["web_fetch", "send_email"]: send_email is a restricted operation no tool implements in this version of Nocturne; remove it (an agent that calls one anyway is refused, and the refusal is recorded with its run)',
    ),
    (
        "agent.tools",
        ["purchase", "delete_data"],
        'spec.agent.tools ["purchase", "delete_data"]: purchase, delete_data are restricted operations no tool implements in this version of Nocturne; remove them (an agent that calls one anyway is refused, and the refusal is recorded with its run)',
    ),
    (
        "agent.allowRestrictedOperations",
        ["send_email"],
        'spec.agent.allowRestrictedOperations ["send_email"]: no tool implements send_email in this version of Nocturne, so there is nothing to allow; remove it',
    ),
    (
        "agent.allowRestrictedOperations",
        ["mine_bitcoin"],
        "spec.agent.allowRestrictedOperations[0] \"mine_bitcoin\": Input should be 'send_email', 'purchase', 'delete_data' or 'change_permissions'",
    ),
    ("agent.maxSteps", 0, "spec.agent.maxSteps 0: Input should be greater than or equal to 1"),
    ("agent.maxSteps", 101, "spec.agent.maxSteps 101: Input should be less than or equal to 100"),
    ("budget", DELETE, "spec.budget: required"),
    ("budget.maxPerRunUSD", DELETE, "spec.budget.maxPerRunUSD: required"),
    (
        "budget.maxPerRunUSD",
        2.5,
        'spec.budget.maxPerRunUSD 2.5: must be a decimal string such as "2.00" (quote it in YAML; floats lose cents)',
    ),
    (
        "budget.maxPerRunUSD",
        "-1",
        'spec.budget.maxPerRunUSD "-1": must be a non-negative decimal string such as "2.00"',
    ),
    (
        "budget.maxPerRunUSD",
        "1e3",
        'spec.budget.maxPerRunUSD "1e3": must be a non-negative decimal string such as "2.00"',
    ),
    (
        "budget.maxPerRunUSD",
        "20.00",
        'spec.budget.maxPerRunUSD "20.00": exceeds the cluster-wide cap of 10 USD per run',
    ),
    (
        "budget.maxTotalUSD",
        "abc",
        'spec.budget.maxTotalUSD "abc": must be a non-negative decimal string such as "2.00"',
    ),
    (
        "budget.maxTotalUSD",
        "1.00",
        "spec.budget: maxTotalUSD 1.00 is below maxPerRunUSD 2.00: a single run could spend past the total",
    ),
    (
        "budget.maxMonthlyUSD",
        12.5,
        'spec.budget.maxMonthlyUSD 12.5: must be a decimal string such as "2.00" (quote it in YAML; floats lose cents)',
    ),
    (
        "budget.maxMonthlyUSD",
        "-3",
        'spec.budget.maxMonthlyUSD "-3": must be a non-negative decimal string such as "2.00"',
    ),
    (
        "budget.maxMonthlyUSD",
        "1.50",
        "spec.budget: maxMonthlyUSD 1.50 is below maxPerRunUSD 2.00: a single run could spend past the month's cap",
    ),
    ("timeoutSeconds", 5, "spec.timeoutSeconds 5: Input should be greater than or equal to 30"),
    (
        "timeoutSeconds",
        86401,
        "spec.timeoutSeconds 86401: Input should be less than or equal to 86400",
    ),
    (
        "timeoutSeconds",
        "600s",
        'spec.timeoutSeconds "600s": must be of type integer',
    ),
    ("retries", -1, "spec.retries -1: Input should be greater than or equal to 0"),
    ("retries", 11, "spec.retries 11: Input should be less than or equal to 10"),
    (
        "concurrencyPolicy",
        "Queue",
        "spec.concurrencyPolicy \"Queue\": Input should be 'Allow', 'Forbid' or 'Replace'",
    ),
    (
        "startingDeadlineSeconds",
        5,
        "spec.startingDeadlineSeconds 5: Input should be greater than or equal to 10",
    ),
    (
        "failurePolicy.pauseAfterConsecutiveFailures",
        0,
        "spec.failurePolicy.pauseAfterConsecutiveFailures 0: Input should be greater than or equal to 1",
    ),
    (
        "notifications.events",
        ["Exploded"],
        "spec.notifications.events[0] \"Exploded\": Input should be 'Succeeded', 'Failed', 'BudgetExceeded', 'AutoPaused', 'Recovered', 'SilentStop' or 'Alert'",
    ),
    (
        "notifications.cooldownMinutes",
        -5,
        "spec.notifications.cooldownMinutes -5: Input should be greater than or equal to 0",
    ),
    (
        "notifications.webhookSecretRef",
        {"name": "slack"},
        "spec.notifications.webhookSecretRef.key: required",
    ),
    (
        "notifications.format",
        "teams",
        "spec.notifications.format \"teams\": Input should be 'slack' or 'json'",
    ),
    (
        "notifications.events",
        ["Failed", "Failed"],
        'spec.notifications.events ["Failed", "Failed"]: must not list an event twice',
    ),
    (
        "notifications",
        {"events": ["Failed"]},
        "spec.notifications: events lists ['Failed'] but webhookSecretRef is missing: name the Secret holding the webhook URL",
    ),
    ("unknownField", True, "spec.unknownField: unknown field"),
    # Secrets and endpoints the cluster admin allows (Settings' defaults)
    (
        "agent.apiKeySecretRef.name",
        "db-admin",
        'spec.agent.apiKeySecretRef.name "db-admin": not a Secret the cluster admin allows for LLM keys (allowed: llm-credentials)',
    ),
    (
        "notifications.webhookSecretRef",
        {"name": "db-admin", "key": "url"},
        'spec.notifications.webhookSecretRef.name "db-admin": not a Secret the cluster admin allows for webhooks (allowed: slack)',
    ),
    (
        "agent.baseURL",
        "http://169.254.169.254/",
        'spec.agent.baseURL "http://169.254.169.254/": not in the allowed endpoints (https://api.openai.com/v1, https://api.anthropic.com)',
    ),
    (
        "agent.baseURL",
        "http://api.openai.com/v1",
        'spec.agent.baseURL "http://api.openai.com/v1": not in the allowed endpoints (https://api.openai.com/v1, https://api.anthropic.com)',
    ),
    (
        "agent.baseURL",
        "https://api.openai.com/v10",
        'spec.agent.baseURL "https://api.openai.com/v10": not in the allowed endpoints (https://api.openai.com/v1, https://api.anthropic.com)',
    ),
    (
        "agent.baseURL",
        "https://api.openai.com.evil.example/v1",
        'spec.agent.baseURL "https://api.openai.com.evil.example/v1": not in the allowed endpoints (https://api.openai.com/v1, https://api.anthropic.com)',
    ),
    (
        "agent.baseURL",
        "https://api.openai.com:8443/v1",
        'spec.agent.baseURL "https://api.openai.com:8443/v1": not in the allowed endpoints (https://api.openai.com/v1, https://api.anthropic.com)',
    ),
    (
        "agent.baseURL",
        "https://sk-user:pw@api.openai.com/v1",
        'spec.agent.baseURL "https://sk-user:pw@api.openai.com/v1": must not carry credentials (user:password@)',
    ),
    (
        "agent.baseURL",
        "https://evil.example#@api.openai.com/v1",
        'spec.agent.baseURL "https://evil.example#@api.openai.com/v1": must not have a fragment (#...)',
    ),
    (
        "agent.baseURL",
        "https://api.openai.com/v1/../../admin",
        "spec.agent.baseURL \"https://api.openai.com/v1/../../admin\": must not have '.' or '..' path segments or encoded slashes",
    ),
    (
        "agent.baseURL",
        "https://api.openai.com/v1/%2e%2e/admin",
        "spec.agent.baseURL \"https://api.openai.com/v1/%2e%2e/admin\": must not have '.' or '..' path segments or encoded slashes",
    ),
    (
        "agent.baseURL",
        "https://api.openai.com/v1?via=evil.example",
        'spec.agent.baseURL "https://api.openai.com/v1?via=evil.example": must not have a query (?...)',
    ),
    (
        "agent.baseURL",
        "https://api.openai.com:0/v1",
        'spec.agent.baseURL "https://api.openai.com:0/v1": has a port that is not a number from 1 to 65535',
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), BAD_INPUTS, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_INPUTS]
)
def test_bad_input_names_field_value_and_rule(path: str, value: Any, expected: str) -> None:
    assert errors_of(with_path(path, value)) == [expected]


def test_at_least_forty_bad_input_cases() -> None:
    assert len(BAD_INPUTS) >= 40


def test_several_errors_are_all_reported() -> None:
    obj = with_path("retries", 99)
    obj["spec"]["timeoutSeconds"] = 1
    assert len(errors_of(obj)) == 2


def test_spec_must_be_a_mapping() -> None:
    obj = schedule()
    obj["spec"] = "0 9 * * *"
    assert errors_of(obj) == ['spec "0 9 * * *": required, must be a mapping']


def test_name_longer_than_63_characters() -> None:
    obj = schedule()
    obj["metadata"]["name"] = "n" * 64
    assert errors_of(obj) == [f'metadata.name "{"n" * 64}": at most 63 characters']


def test_offline_provider_needs_no_key() -> None:
    obj = with_path("agent.apiKeySecretRef", DELETE)
    obj["spec"]["agent"]["provider"] = "offline"
    assert errors_of(obj) == []


def test_opting_in_to_a_restricted_operation_no_tool_implements_is_refused() -> None:
    """No stub answers "allowed but not available": the opt-in itself is the error, on both
    fields, and the valid rest of the spec still validates."""
    obj = with_path("agent.tools", ["web_fetch", "send_email"])
    obj["spec"]["agent"]["allowRestrictedOperations"] = ["send_email"]
    assert [e.split(":")[0] for e in errors_of(obj)] == [
        'spec.agent.tools ["web_fetch", "send_email"]',
        'spec.agent.allowRestrictedOperations ["send_email"]',
    ]
    assert errors_of(with_path("agent.tools", ["web_fetch"])) == []


def test_cluster_cap_comes_from_settings() -> None:
    generous = Settings(max_per_run_usd=Decimal("50"))
    assert errors_of(with_path("budget.maxPerRunUSD", "20.00"), generous) == []


@pytest.mark.parametrize("expr", ["*/5 * * * *", "0,5 9 * * *", "0,30 9 * * *", "@every 59m"])
def test_too_frequent_schedules_name_the_interval(expr: str) -> None:
    [error] = errors_of(with_path("schedule", expr))
    assert error.startswith(f'spec.schedule "{expr}": runs as often as every ')
    assert error.endswith("minimum interval is 60 min")


@pytest.mark.parametrize("hour", range(0, 24, 5))
def test_minimum_interval_does_not_depend_on_the_time_of_day(hour: int) -> None:
    """`0,5 9 * * *` is rejected at any hour, including 09:03 between its two runs."""
    obj = with_path("schedule", "0,5 9 * * *")
    for minute in (0, 3, 59):
        now = datetime(2026, 11, 26, hour, minute, tzinfo=UTC)
        assert [str(e) for e in validate(obj, SETTINGS, now=now).errors] == [
            'spec.schedule "0,5 9 * * *": runs as often as every 5 min (in Asia/Tokyo), '
            "minimum interval is 60 min"
        ]


def test_minimum_interval_is_a_setting() -> None:
    relaxed = Settings(min_interval_minutes=5)
    assert errors_of(with_path("schedule", "*/5 * * * *"), relaxed) == []


@pytest.mark.parametrize(
    ("expr", "rule"),
    [
        (
            "TZ=Asia/Tokyo 0 9 * * *",
            "cannot use TZ or CRON_TZ in schedule, use spec.timeZone instead",
        ),
        (
            "CRON_TZ=UTC 0 9 * * *",
            "cannot use TZ or CRON_TZ in schedule, use spec.timeZone instead",
        ),
        ("0 9 * *", "expected 5 fields (minute hour day-of-month month day-of-week), found 4"),
        (
            "0 0 9 * * *",
            "expected 5 fields (minute hour day-of-month month day-of-week), found 6; "
            "a seconds field is not supported",
        ),
        ("61 9 * * *", 'minute field "61": value 61 out of range 0-59'),
        ("0 25 * * *", 'hour field "25": value 25 out of range 0-23'),
        ("*/0 * * * *", 'minute field "*/0": step "0" must be a positive number'),
        (
            "0 9 * * MON-FUNDAY",
            'day-of-week field "MON-FUNDAY": "FUNDAY" is not a number or a day name (SUN-SAT)',
        ),
        (
            "0 9 30 2 *",
            'never fires: no date matches day-of-month "30", month "2" and day-of-week "*"',
        ),
        (
            "@fortnightly",
            'unknown descriptor "@fortnightly" (expected @yearly, @annually, '
            "@monthly, @weekly, @daily, @midnight, @hourly or @every <duration>)",
        ),
    ],
)
def test_cron_errors_name_field_value_and_rule(expr: str, rule: str) -> None:
    assert errors_of(with_path("schedule", expr)) == [f'spec.schedule "{expr}": {rule}']


def test_quota_lets_the_oldest_schedules_run() -> None:
    limited = Settings(max_schedules_per_namespace=2)
    peers = [
        Peer("a", "2026-01-01T00:00:00Z"),
        Peer("b", "2026-01-02T00:00:00Z"),
        Peer("daily-ai-news", "2026-01-03T00:00:00Z"),
    ]
    result = validate(schedule(), limited, now=NOW, peers=peers)
    assert [str(e) for e in result.errors] == [
        'metadata.namespace "daily-ai-news": quota exceeded: at most 2 AgentSchedules per '
        "namespace (3 exist; the oldest 2 run)"
    ]
    older = [Peer("daily-ai-news", "2025-12-31T00:00:00Z"), *peers[:2]]
    assert validate(schedule(), limited, now=NOW, peers=older).ok


def test_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate(schedule(), SETTINGS, now=datetime(2026, 1, 1))  # noqa: DTZ001


def test_schedule_the_controller_would_stall_on_is_an_error() -> None:
    """Pacific/Chatham's April change makes robfig's Next return the same time; the controller
    then never fires again."""
    obj = with_path("schedule", "52 3 * * *")
    obj["spec"]["timeZone"] = "Pacific/Chatham"
    [error] = errors_of(obj)
    assert error.startswith(
        'spec.schedule "52 3 * * *": in Pacific/Chatham the CronJob controller would stop firing on '
    )


def test_dst_gap_is_a_warning_not_an_error() -> None:
    obj = with_path("schedule", "30 2 * * *")
    obj["spec"]["timeZone"] = "America/New_York"
    result = validate(obj, SETTINGS, now=NOW)
    assert result.ok
    assert any(w.startswith("skipped 2027-03-14 02:30") for w in result.warnings)
    assert not any(w.startswith("repeated") for w in result.warnings)


def test_an_unquoted_on_key_is_refused_not_silently_lost() -> None:
    """YAML 1.1 (kubectl, Helm, PyYAML) reads `on:` as the boolean true; the field is `events`,
    and the stray key is an error naming what happened."""
    obj = yaml.safe_load(
        """
        notifications:
          webhookSecretRef: {name: slack, key: url}
          on: [Failed]
        """
    )
    assert errors_of(with_path("notifications", obj["notifications"])) == [
        "spec.notifications: a key was read as true: YAML 1.1 turns an unquoted on/off/yes/no "
        "key into a boolean; quote it (notifications use 'events', not 'on')"
    ]


# ---- Secrets and endpoints the cluster admin allows --------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "https://api.openai.com/v1/",
        "https://API.OpenAI.com:443/v1",
        "https://api.openai.com./v1/deployments/x",
        "https://api.anthropic.com",
    ],
)
def test_allowed_endpoints_cover_their_spellings_and_subpaths(url: str) -> None:
    assert errors_of(with_path("agent.baseURL", url)) == []


def test_an_empty_base_url_is_the_providers_own_endpoint_and_always_allowed() -> None:
    closed = Settings(llm_base_urls=[])
    assert errors_of(with_path("agent.baseURL", ""), closed) == []
    assert errors_of(with_path("agent.baseURL", "https://api.openai.com/v1"), closed) == [
        'spec.agent.baseURL "https://api.openai.com/v1": no endpoints are allowed but the '
        "provider's own (leave baseURL empty)"
    ]


def test_http_only_where_the_admin_lists_it() -> None:
    local = Settings(llm_base_urls=["http://127.0.0.1:8080/v1", "https://[::1]:8443"])
    for url in ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/x", "https://[0::1]:8443/"):
        assert errors_of(with_path("agent.baseURL", url), local) == [], url
    for url in ("http://127.0.0.1/v1", "https://127.0.0.1:8080/v1", "http://127.0.0.2:8080/v1"):
        [error] = errors_of(with_path("agent.baseURL", url), local)
        assert error == (
            f'spec.agent.baseURL "{url}": not in the allowed endpoints '
            "(http://127.0.0.1:8080/v1, https://[::1]:8443)"
        )


def test_secrets_allowed_come_from_settings() -> None:
    mine = Settings(llm_secrets=["team-llm"], webhook_secrets=["team-hook", "slack"])
    obj = with_path("agent.apiKeySecretRef.name", "team-llm")
    obj["spec"]["notifications"] = {"webhookSecretRef": {"name": "team-hook", "key": "url"}}
    assert errors_of(obj, mine) == []
    assert errors_of(schedule(), mine) == [
        'spec.agent.apiKeySecretRef.name "llm-credentials": not a Secret the cluster admin '
        "allows for LLM keys (allowed: team-llm)"
    ]


def test_no_llm_secrets_means_only_offline_runs() -> None:
    none = Settings(llm_secrets=[])
    assert errors_of(schedule(), none) == [
        'spec.agent.apiKeySecretRef.name "llm-credentials": not a Secret the cluster admin '
        "allows for LLM keys (allowed: none)"
    ]
    offline = with_path("agent.apiKeySecretRef", DELETE)
    offline["spec"]["agent"]["provider"] = "offline"
    assert errors_of(offline, none) == []


def test_a_key_named_for_the_offline_provider_must_be_allowed_too() -> None:
    """The runner pod would still get the Secret's value in its environment."""
    obj = with_path("agent.apiKeySecretRef.name", "db-admin")
    obj["spec"]["agent"]["provider"] = "offline"
    [error] = errors_of(obj)
    assert error.startswith('spec.agent.apiKeySecretRef.name "db-admin": not a Secret')


def test_every_credential_error_is_reported_at_once() -> None:
    obj = with_path("agent.apiKeySecretRef.name", "db-admin")
    obj["spec"]["agent"]["baseURL"] = "http://10.0.0.1/"
    obj["spec"]["notifications"] = {"webhookSecretRef": {"name": "kube-root", "key": "ca"}}
    fields = [e.field for e in validate(obj, SETTINGS, now=NOW).errors]
    assert fields == [
        "spec.agent.apiKeySecretRef.name",
        "spec.agent.baseURL",
        "spec.notifications.webhookSecretRef.name",
    ]


def test_the_years_scan_is_computed_once_an_hour() -> None:
    """The sweep validates every schedule every minute: the fire-time and DST scan of a spec is
    reused within the hour, and its result is what a fresh scan gives."""
    body = schedule(schedule="30 2 * * *", timeZone="America/New_York")  # meets both DST changes
    _timing.cache_clear()
    first = validate(body, SETTINGS, now=NOW.replace(minute=1))
    again = validate(body, SETTINGS, now=NOW.replace(minute=59))
    assert _timing.cache_info().hits == 1
    assert (again.warnings, again.min_interval) == (first.warnings, first.min_interval)
    assert first.warnings  # the spring-forward gap and the fall-back fold are noted
    later = validate(body, SETTINGS, now=NOW.replace(hour=NOW.hour + 1))
    assert _timing.cache_info().misses == 2  # a new hour: scanned again
    assert later.warnings == first.warnings
