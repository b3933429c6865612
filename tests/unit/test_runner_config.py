"""The runner reads exactly what the operator renders, and says precisely what is wrong."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent_runner import config, exitcodes
from agent_runner.config import TOKEN_FILE, ConfigError, load_env, parse_task
from nocturne_operator import render
from nocturne_operator.api import model as api
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.render import ScheduleRef, task_document
from nocturne_operator.settings import Settings

REF = ScheduleRef("competitor-monitor", "research", "0b6c9a1e-0000-4000-8000-000000000001")
RUN_API_URL = "https://nocturne-operator.nocturne.svc:8443"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
API_KEY = "sk-test-abcdefghijklmnopqrstuvwxyz0123456789"


def spec(**overrides: Any) -> AgentScheduleSpec:
    data: dict[str, Any] = {
        "schedule": "0 */6 * * *",
        "timeZone": "Europe/Berlin",
        "task": {
            "query": "Report price changes since the last check.",
            "context": {"pages": ["https://example.com/pricing"], "limit": 3},
            "stateKey": "competitor-prices",
        },
        "agent": {
            "model": "gpt-4o-mini",
            "baseURL": "https://llm.internal/v1",
            "apiKeySecretRef": {"name": "llm", "key": "OPENAI_API_KEY"},
            "tools": ["web_fetch"],
            "maxSteps": 7,
        },
        "budget": {"maxPerRunUSD": "0.25", "maxTotalUSD": "30.000001"},
        "timeoutSeconds": 300,
    }
    data.update(overrides)
    return AgentScheduleSpec.model_validate(data)


def document(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(task_document(REF, spec(**overrides))))
    return data


def env(**overrides: str) -> dict[str, str]:
    values = {
        "NOCTURNE_TASK": json.dumps(document()),
        "NOCTURNE_POD_NAME": "competitor-monitor-29000000-abcde",
        "NOCTURNE_POD_UID": "pod-uid",
        "NOCTURNE_JOB_NAME": "competitor-monitor-29000000",
        "NOCTURNE_JOB_UID": "job-uid",
        "NOCTURNE_RUN_API_URL": RUN_API_URL,
        "NOCTURNE_RUN_API_CA": CA_PEM,
        "NOCTURNE_LLM_API_KEY": API_KEY,
    }
    values.update(overrides)
    return values


def test_rendered_task_document_round_trips() -> None:
    task = parse_task(json.dumps(task_document(REF, spec())))
    assert task.version == 1
    assert (task.schedule.namespace, task.schedule.name, task.schedule.uid) == (
        REF.namespace,
        REF.name,
        REF.uid,
    )
    assert task.task.query == "Report price changes since the last check."
    assert task.task.context == {"pages": ["https://example.com/pricing"], "limit": 3}
    assert task.task.state_key == "competitor-prices"
    assert task.agent.model == "gpt-4o-mini"
    assert task.agent.provider == "openai"
    assert task.agent.base_url == "https://llm.internal/v1"
    assert task.agent.tools == ("web_fetch",)
    assert task.agent.allow_restricted_operations == ()
    assert task.agent.max_steps == 7
    assert task.budget.max_per_run_usd == Decimal("0.25")
    assert task.budget.max_total_usd == Decimal("30.000001")
    assert isinstance(task.budget.max_per_run_usd, Decimal)
    assert task.timeout_seconds == 300
    assert task.time_zone == "Europe/Berlin"


def test_minimal_offline_document_round_trips_with_defaults() -> None:
    minimal = spec(
        task={"query": "digest"},
        agent={"model": "offline-demo", "provider": "offline"},
        budget={"maxPerRunUSD": "1"},
    )
    task = parse_task(task_document(REF, minimal))
    assert task.task.context == {}
    assert task.task.state_key is None
    assert task.agent.provider == "offline"
    assert task.agent.tools == ()
    assert task.agent.max_steps == 10
    assert task.budget.max_total_usd is None


def test_runner_vocabulary_matches_the_operator() -> None:
    assert config.TOOLS == api.TOOLS
    assert config.RESTRICTED_OPERATIONS == api.RESTRICTED_OPERATIONS
    assert {p.value for p in api.Provider} == {"openai", "anthropic", "offline"}


def test_config_errors_exit_with_the_non_retryable_config_code() -> None:
    assert ConfigError.exit_code == exitcodes.CONFIG_ERROR
    assert exitcodes.CONFIG_ERROR in exitcodes.NON_RETRYABLE


def test_rendered_env_is_what_the_runner_reads() -> None:
    rendered = render.render_cronjob(
        REF,
        spec(),
        Settings(),
        suspend=False,
        min_interval=None,
        run_api=render.RunApiEndpoint(RUN_API_URL, CA_PEM),
    )
    container = rendered["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    names = {item["name"] for item in container["env"]}
    assert names <= set(config.ENV_VARS)
    assert "NOCTURNE_DATABASE_URL" not in names, "runner pods hold no database credentials"
    task = next(e["value"] for e in container["env"] if e["name"] == "NOCTURNE_TASK")
    assert parse_task(task).schedule.uid == REF.uid
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert load_env({**env(), **values}).token_file == TOKEN_FILE


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["budget"].update(maxPerRunUSD=2.5),
            "task document field budget.maxPerRunUSD 2.5: Value error, must be a non-negative "
            'decimal string such as "2.00"',
        ),
        (
            lambda d: d["budget"].update(maxPerRunUSD="-1"),
            'budget.maxPerRunUSD "-1": Value error, must be a non-negative decimal string',
        ),
        (
            lambda d: d["agent"].update(provider="gemini"),
            "agent.provider \"gemini\": Input should be 'openai', 'anthropic' or 'offline'",
        ),
        (lambda d: d["agent"].update(maxSteps=0), "agent.maxSteps 0: Input should be greater"),
        (lambda d: d["agent"].update(tools=["shell"]), 'agent.tools.0 "shell": Input should be'),
        (lambda d: d.update(surprise=1), "task document field surprise 1: Extra inputs"),
        (lambda d: d["task"].pop("query"), "task document field task.query: is required"),
        (
            lambda d: d["agent"].update(baseURL="ftp://x"),
            'agent.baseURL "ftp://x": Value error, must be empty or an http(s) URL',
        ),
    ],
)
def test_invalid_documents_name_field_value_and_rule(mutate: Any, expected: str) -> None:
    data = document()
    mutate(data)
    with pytest.raises(ConfigError) as excinfo:
        parse_task(data)
    assert expected in str(excinfo.value)
    assert excinfo.value.exit_code == exitcodes.CONFIG_ERROR


def test_other_versions_are_refused_before_field_checks() -> None:
    data = document()
    data["version"] = 2
    data["newField"] = True
    with pytest.raises(ConfigError, match=r"version 2: this runner understands version 1 only"):
        parse_task(data)


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_task("{")
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        parse_task("[]")


def test_long_values_are_shortened_in_messages() -> None:
    data = document()
    data["agent"]["model"] = "m" * 500
    with pytest.raises(ConfigError) as excinfo:
        parse_task(data)
    assert "..." in str(excinfo.value)
    assert "m" * 100 not in str(excinfo.value)


def test_env_is_read_with_defaults() -> None:
    runner_env = load_env(env())
    assert parse_task(runner_env.task).schedule.name == "competitor-monitor"
    assert runner_env.job_uid == "job-uid"
    assert runner_env.run_api_url == RUN_API_URL
    assert runner_env.run_api_ca == CA_PEM
    assert runner_env.token_file == TOKEN_FILE
    assert runner_env.llm_api_key is not None
    assert runner_env.llm_api_key.get_secret_value() == API_KEY
    assert runner_env.termination_log == Path("/dev/termination-log")
    assert runner_env.web_fetch_allow_private is False
    assert API_KEY not in repr(runner_env)


def test_env_optional_values() -> None:
    runner_env = load_env(
        env(
            NOCTURNE_RUN_API_URL=RUN_API_URL + "/",
            NOCTURNE_RUN_API_TOKEN_FILE="/var/run/token",  # noqa: S106 - a path
            NOCTURNE_LLM_API_KEY="",
            NOCTURNE_TERMINATION_LOG="/tmp/summary.json",  # noqa: S108 - a path, not a file
            # Run-now Jobs carry it for the operator (which reads it from the Job); ignored here.
            NOCTURNE_MANUAL_REQUEST="run-now-7",
            NOCTURNE_WEB_FETCH_ALLOW_PRIVATE="true",
            NOCTURNE_SOMETHING_ELSE="ignored",
        )
    )
    assert runner_env.run_api_url == RUN_API_URL  # no trailing slash
    assert runner_env.token_file == Path("/var/run/token")
    assert runner_env.llm_api_key is None
    assert runner_env.termination_log == Path("/tmp/summary.json")  # noqa: S108
    assert runner_env.web_fetch_allow_private is True


def test_no_database_or_price_table_variables_any_more() -> None:
    assert not any("DATABASE" in name or "PRICE" in name for name in config.ENV_VARS)
    assert "NOCTURNE_TASK_FILE" not in config.ENV_VARS


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NOCTURNE_TASK", None, "NOCTURNE_TASK: is required"),
        ("NOCTURNE_TASK", "{", 'NOCTURNE_TASK "{": String should have at least 2 characters'),
        ("NOCTURNE_POD_UID", None, "NOCTURNE_POD_UID: is required"),
        ("NOCTURNE_POD_NAME", None, "NOCTURNE_POD_NAME: is required"),
        ("NOCTURNE_JOB_NAME", None, "NOCTURNE_JOB_NAME: is required"),
        ("NOCTURNE_JOB_UID", None, "NOCTURNE_JOB_UID: is required"),
        ("NOCTURNE_RUN_API_URL", None, "NOCTURNE_RUN_API_URL: is required"),
        (
            "NOCTURNE_RUN_API_URL",
            "http://nocturne-operator:8443",
            'NOCTURNE_RUN_API_URL "http://nocturne-operator:8443": Value error, must be an '
            "https:// URL (the run API is served over TLS)",
        ),
        ("NOCTURNE_RUN_API_URL", "https://", "must be an https:// URL"),
        ("NOCTURNE_RUN_API_URL", "nocturne-operator:8443", "must be an https:// URL"),
        ("NOCTURNE_RUN_API_URL", "https://a b", "must not contain spaces"),
        ("NOCTURNE_RUN_API_CA", None, "NOCTURNE_RUN_API_CA: is required"),
        (
            "NOCTURNE_RUN_API_CA",
            "not a certificate",
            'NOCTURNE_RUN_API_CA "not a certificate": Value error, must be a PEM certificate '
            "bundle (the operator's run API CA)",
        ),
        (
            "NOCTURNE_WEB_FETCH_ALLOW_PRIVATE",
            "perhaps",
            'NOCTURNE_WEB_FETCH_ALLOW_PRIVATE "perhaps": Input should be a valid boolean',
        ),
    ],
)
def test_bad_env_values_name_the_variable_and_the_rule(
    name: str, value: str | None, expected: str
) -> None:
    values = env()
    if value is None:
        del values[name]
    else:
        values[name] = value
    with pytest.raises(ConfigError) as excinfo:
        load_env(values)
    assert expected in str(excinfo.value)
    assert excinfo.value.exit_code == exitcodes.CONFIG_ERROR


def test_an_empty_required_variable_counts_as_unset() -> None:
    with pytest.raises(ConfigError, match="NOCTURNE_RUN_API_URL: is required"):
        load_env(env(NOCTURNE_RUN_API_URL=""))


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("{not json", "task document: not valid JSON"),
        ("[1, 2]", "task document: must be a JSON object, got list"),
        ('{"version": 2}', "task document version 2: this runner understands version 1 only"),
        ('{"version": 1}', "task document field schedule: is required"),
    ],
)
def test_a_bad_task_in_the_env_is_a_config_error(task: str, expected: str) -> None:
    runner_env = load_env(env(NOCTURNE_TASK=task))
    with pytest.raises(ConfigError) as excinfo:
        parse_task(runner_env.task)
    assert expected in str(excinfo.value)


def test_env_errors_never_show_secrets() -> None:
    values = env(NOCTURNE_WEB_FETCH_ALLOW_PRIVATE="perhaps", NOCTURNE_LLM_API_KEY=API_KEY)
    del values["NOCTURNE_JOB_UID"]
    values["NOCTURNE_RUN_API_URL"] = "http://x"
    with pytest.raises(ConfigError) as excinfo:
        load_env(values)
    message = str(excinfo.value)
    assert "NOCTURNE_JOB_UID: is required" in message
    assert "NOCTURNE_RUN_API_URL" in message
    assert API_KEY not in message
