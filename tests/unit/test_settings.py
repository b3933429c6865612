"""Cluster-wide settings: defaults, environment, file, and clear errors for bad values."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from nocturne_operator.errors import SettingsError
from nocturne_operator.settings import load_settings


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.max_schedules_per_namespace == 50
    assert settings.min_interval_minutes == 60
    assert settings.max_per_run_usd == Decimal("10")


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOCTURNE_MIN_INTERVAL_MINUTES", "15")
    monkeypatch.setenv("NOCTURNE_RUNNER_RESOURCES__MEMORY_LIMIT", "1Gi")
    settings = load_settings()
    assert settings.min_interval_minutes == 15
    assert settings.runner_resources.memory_limit == "1Gi"


def test_file_with_dashes_or_underscores(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("max-per-run-usd: '2.50'\nmax_schedules_per_namespace: 5\n")
    settings = load_settings(path)
    assert settings.max_per_run_usd == Decimal("2.50")
    assert settings.max_schedules_per_namespace == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "min_interval_minutes: 0\n",
            "min_interval_minutes 0: Input should be greater than or equal to 1",
        ),
        ("max_per_run_usd: -1\n", "max_per_run_usd -1: Input should be greater than or equal to 0"),
        (
            "database_pool_size: 0\n",
            "database_pool_size 0: Input should be greater than or equal to 1",
        ),
        (
            "database_pool_size: 101\n",
            "database_pool_size 101: Input should be less than or equal to 100",
        ),
        (
            "run_api_url: http://op:8443\n",
            "run_api_url 'http://op:8443': String should match pattern",
        ),
        ("run_api_port: 0\n", "run_api_port 0: Input should be greater than or equal to 1"),
        (
            "runner_token_expiration_seconds: 60\n",
            "runner_token_expiration_seconds 60: Input should be greater than or equal to 600",
        ),
        (
            "max_schedules_per_namespace: many\n",
            "max_schedules_per_namespace 'many': Input should be a valid integer",
        ),
        (
            "runner_image_pull_policy: Sometimes\n",
            "runner_image_pull_policy 'Sometimes': String should match pattern",
        ),
        (
            "reconcile_interval_seconds: 0.5\n",
            "reconcile_interval_seconds 0.5: Input should be greater than or equal to 1",
        ),
        (
            "notification_max_attempts: 0\n",
            "notification_max_attempts 0: Input should be greater than or equal to 1",
        ),
        (
            "notification_retry_base_seconds: 0\n",
            "notification_retry_base_seconds 0: Input should be greater than 0",
        ),
        (
            "notification_retry_base_seconds: 60\nnotification_retry_cap_seconds: 30\n",
            "notification_retry_cap_seconds 30.0 is below notification_retry_base_seconds 60.0",
        ),
        (
            "notifications_enabled: perhaps\n",
            "notifications_enabled 'perhaps': Input should be a valid boolean",
        ),
        ("surprise: 1\n", "surprise 1: Extra inputs are not permitted"),
        (
            "llm_secrets: [llm-credentials, Bad_Name]\n",
            "llm_secrets.1 'Bad_Name': Value error, not a Secret name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters)",
        ),
        (
            "llm_secrets: llm-credentials\n",
            "llm_secrets 'llm-credentials': Input should be a valid list",
        ),
        (
            "webhook_secrets: ['-slack']\n",
            "webhook_secrets.0 '-slack': Value error, not a Secret name",
        ),
        (
            f"webhook_secrets: [{'a' * 254}]\n",
            "webhook_secrets.0 '" + "a" * 254 + "': Value error, not a Secret name",
        ),
        (
            "llm_base_urls: ['ftp://models.internal']\n",
            "llm_base_urls.0 'ftp://models.internal': Value error, must be an http or https URL",
        ),
        (
            "llm_base_urls: ['models.internal/v1']\n",
            "llm_base_urls.0 'models.internal/v1': Value error, must be an http or https URL",
        ),
        (
            "llm_base_urls: ['https:///v1']\n",
            "llm_base_urls.0 'https:///v1': Value error, has no host",
        ),
        (
            "llm_base_urls: ['https://user:pw@models.internal']\n",
            "llm_base_urls.0 'https://user:pw@models.internal': Value error, must not carry credentials (user:password@)",
        ),
        (
            "llm_base_urls: ['https://models.internal/v1#x']\n",
            "llm_base_urls.0 'https://models.internal/v1#x': Value error, must not have a fragment (#...)",
        ),
        (
            "llm_base_urls: ['https://models.internal/v1?x=1']\n",
            "llm_base_urls.0 'https://models.internal/v1?x=1': Value error, must not have a query (?...)",
        ),
        (
            "llm_base_urls: ['https://models.internal:70000']\n",
            "llm_base_urls.0 'https://models.internal:70000': Value error, has a port that is not a number from 1 to 65535",
        ),
        (
            "llm_base_urls: ['https://models.internal/a/../b']\n",
            "llm_base_urls.0 'https://models.internal/a/../b': Value error, must not have '.' or '..' path segments",
        ),
        (
            "webhook_allow_private: perhaps\n",
            "webhook_allow_private 'perhaps': Input should be a valid boolean",
        ),
        ("- a list\n", "settings must be a mapping, got list"),
        ("key: [unclosed\n", "cannot read settings"),
    ],
)
def test_bad_values_name_file_field_and_rule(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(content)
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings"):
        load_settings(tmp_path / "absent.yaml")


def test_credential_defaults_are_documented_names() -> None:
    settings = load_settings()
    assert settings.llm_secrets == ["llm-credentials"]
    assert settings.llm_base_urls == ["https://api.openai.com/v1", "https://api.anthropic.com"]
    assert settings.webhook_secrets == ["slack"]
    assert settings.webhook_allow_private is False


def test_credential_lists_from_the_environment_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOCTURNE_LLM_SECRETS", '["llm-api-key"]')
    monkeypatch.setenv("NOCTURNE_LLM_BASE_URLS", '["http://127.0.0.1:8080/v1"]')
    monkeypatch.setenv("NOCTURNE_WEBHOOK_SECRETS", "[]")
    monkeypatch.setenv("NOCTURNE_WEBHOOK_ALLOW_PRIVATE", "true")
    settings = load_settings()
    assert settings.llm_secrets == ["llm-api-key"]
    assert settings.llm_base_urls == ["http://127.0.0.1:8080/v1"]
    assert settings.webhook_secrets == []
    assert settings.webhook_allow_private is True
    monkeypatch.setenv("NOCTURNE_LLM_BASE_URLS", '["gopher://x"]')
    with pytest.raises(SettingsError, match=r"llm_base_urls.0 'gopher://x': Value error, must be"):
        load_settings()
