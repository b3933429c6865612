"""Retention settings: defaults, 0 for "keep forever", errors naming the field, the value and
the rule for values below the minimum, and the chart rendering them (and refusing them) the
same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from nocturne_operator.errors import SettingsError
from nocturne_operator.settings import MIN_RETENTION_DAYS, load_settings
from unit.test_helm_chart import CHART, RELEASE, one, render, run_helm


def test_defaults_keep_runs_and_audit_rows_400_days() -> None:
    settings = load_settings()
    assert (settings.history_retention_days, settings.audit_retention_days) == (400, 400)
    assert settings.retention_batch_size == 500


@pytest.mark.parametrize("days", [0, MIN_RETENTION_DAYS, 36_500])
def test_zero_keeps_forever_and_the_minimum_is_allowed(days: int) -> None:
    settings = load_settings(history_retention_days=days, audit_retention_days=days)
    assert (settings.history_retention_days, settings.audit_retention_days) == (days, days)


def test_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOCTURNE_HISTORY_RETENTION_DAYS", "90")
    monkeypatch.setenv("NOCTURNE_RETENTION_BATCH_SIZE", "50")
    settings = load_settings()
    assert (settings.history_retention_days, settings.retention_batch_size) == (90, 50)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "history_retention_days: 10\n",
            "history_retention_days 10: Value error, below the minimum of 62 days (the monthly "
            "budget sums this month's runs in each schedule's zone and cost by month reads the "
            "month before; 0 keeps rows forever)",
        ),
        ("audit_retention_days: 61\n", "audit_retention_days 61: Value error, below the minimum"),
        (
            "audit_retention_days: -1\n",
            "audit_retention_days -1: Input should be greater than or equal to 0",
        ),
        (
            "history_retention_days: 36501\n",
            "history_retention_days 36501: Input should be less than or equal to 36500",
        ),
        (
            "history_retention_days: a year\n",
            "history_retention_days 'a year': Input should be a valid integer",
        ),
        (
            "retention_batch_size: 0\n",
            "retention_batch_size 0: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_rule(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(content)
    with pytest.raises(SettingsError) as raised:
        load_settings(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_the_chart_renders_the_retention_settings(tmp_path: Path) -> None:
    def settings_of(*args: str) -> tuple[int, int, int]:
        configmap = one(render(*args), "ConfigMap", f"{RELEASE}-settings")
        path = tmp_path / "settings.yaml"
        path.write_text(configmap["data"]["settings.yaml"])
        s = load_settings(config_file=path)
        return s.history_retention_days, s.audit_retention_days, s.retention_batch_size

    assert settings_of() == (400, 400, 500)
    assert settings_of(
        "--set=retention.historyDays=0",
        "--set=retention.auditDays=90",
        "--set=retention.batchSize=100",
    ) == (0, 90, 100)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("retention.historyDays=10", "at '/retention/historyDays': minimum: got 10, want 62"),
        ("retention.auditDays=-1", "at '/retention/auditDays': minimum: got -1, want 62"),
        ("retention.batchSize=0", "at '/retention/batchSize': minimum: got 0, want 1"),
        ("retention.keepForever=true", "additional properties 'keepForever' not allowed"),
    ],
)
def test_the_chart_refuses_what_the_operator_would(value: str, message: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), f"--set={value}")
    assert result.returncode != 0, f"{value} was accepted"
    assert message in result.stderr, result.stderr
