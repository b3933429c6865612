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
