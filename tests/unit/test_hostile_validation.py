"""Hostile input to validate(): every path ends in a field-named error, never an exception, and
says what the apiserver or the operator would say (issue 12)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from nocturne_operator.prices import load_price_table
from nocturne_operator.schedule.validation import validate
from nocturne_operator.settings import Settings
from unit.test_validation import NOW, SETTINGS, errors_of, schedule, with_path

PRICES = load_price_table()


def test_the_base_schedule_is_valid() -> None:
    assert errors_of(schedule()) == []
    assert errors_of(schedule(), prices=PRICES) == []


@pytest.mark.parametrize(
    "zone",
    ["America", "Asia", "Etc", "localtime", "posixrules", "right/UTC", "posix/Asia/Tokyo", "Local"],
)
def test_zones_the_cronjob_controller_refuses_are_field_errors(zone: str) -> None:
    assert errors_of(schedule(timeZone=zone)) == [
        f'spec.timeZone "{zone}": not an IANA time zone name (e.g. Asia/Tokyo)'
    ]


@pytest.mark.parametrize(
    ("path", "value", "kind"),
    [
        ("timeoutSeconds", "600", "integer"),
        ("retries", True, "integer"),
        ("suspend", "yes", "boolean"),
        ("suspend", 1, "boolean"),
        ("timeoutSeconds", 600.5, "integer"),
        ("agent.maxSteps", "10", "integer"),
        ("notifications.cooldownMinutes", False, "integer"),
        ("failurePolicy.pauseAfterConsecutiveFailures", "3", "integer"),
        ("startingDeadlineSeconds", "60", "integer"),
    ],
)
def test_no_lax_coercion_the_apiserver_would_refuse(path: str, value: Any, kind: str) -> None:
    [error] = errors_of(with_path(path, value))
    assert error.startswith(f"spec.{path} ")
    assert error.endswith(f": must be of type {kind}")


@pytest.mark.parametrize(
    "name", ["Digest", "digest_1", "-digest", "digest-", "dig est", "dïgest", "a..b"]
)
def test_names_must_be_dns_1123_subdomains(name: str) -> None:
    body = schedule()
    body["metadata"]["name"] = name
    [error] = errors_of(body)
    assert error.startswith("metadata.name ")
    assert "lowercase RFC 1123 subdomain" in error


def test_a_missing_name_is_an_error() -> None:
    body = schedule()
    del body["metadata"]["name"]
    assert errors_of(body) == ["metadata.name: required"]


@pytest.mark.parametrize("metadata", ["x", 5, ["name", "digest"]])
def test_metadata_that_is_not_a_mapping_is_an_error(metadata: Any) -> None:
    body = schedule()
    body["metadata"] = metadata
    assert errors_of(body)[0].startswith("metadata ")
    assert errors_of(body)[0].endswith(": must be a mapping")


@pytest.mark.parametrize("zero", ["0", "0.0", "000.000000"])
def test_a_zero_run_budget_is_refused(zero: str) -> None:
    assert errors_of(schedule(budget={"maxPerRunUSD": zero})) == [
        f'spec.budget.maxPerRunUSD "{zero}": must be greater than 0 (a run with no budget '
        "always fails)"
    ]


def test_a_model_missing_from_the_price_table_is_refused() -> None:
    body = schedule(
        agent={
            "model": "x",
            "apiKeySecretRef": {"name": "llm-credentials", "key": "OPENAI_API_KEY"},
        }
    )
    assert errors_of(body, prices=PRICES) == [
        'spec.agent.model "x": no price for provider "openai" in the cluster\'s price table'
    ]
    offline = schedule(agent={"model": "offline-x", "provider": "offline"})
    assert errors_of(offline, prices=PRICES) == [
        'spec.agent.model "offline-x": no price for provider "offline" in the cluster\'s '
        "price table"
    ]
    assert (
        errors_of(schedule(agent={"model": "offline-demo", "provider": "offline"}), prices=PRICES)
        == []
    )


def test_a_task_too_large_for_the_job_template_is_refused() -> None:
    body = schedule(task={"query": "q", "context": {"blob": "x" * 300_000}})
    [error] = errors_of(body)
    assert error.startswith("spec.task.context: ")
    assert "262144 bytes" in error


def test_a_task_that_fits_is_accepted() -> None:
    assert errors_of(schedule(task={"query": "q", "context": {"blob": "x" * 200_000}})) == []


@pytest.mark.parametrize("expr", ["@every -1h", "@every 0s", "@every 0", "@every -0.5m"])
def test_a_non_positive_every_says_so(expr: str) -> None:
    assert errors_of(schedule(schedule=expr)) == [
        f'spec.schedule "{expr}": the @every duration must be positive (the CronJob controller '
        "would fire a zero or negative duration every second)"
    ]


def test_money_in_messages_is_a_plain_decimal() -> None:
    settings = Settings(max_per_run_usd=Decimal("1E+2"))
    [error] = errors_of(schedule(budget={"maxPerRunUSD": "101"}), settings)
    assert error == (
        'spec.budget.maxPerRunUSD "101": exceeds the cluster-wide cap of 100 USD per run'
    )


def test_an_unknown_zone_never_raises_in_any_form() -> None:
    for zone in ["../etc/passwd", "A" * 64, "\x00", "UTC\n", "Asia/../UTC", 5, None, True]:
        validate(schedule(timeZone=zone), SETTINGS, now=NOW)


def test_the_docs_examples_name_priced_models() -> None:
    for path in sorted((Path(__file__).parents[2] / "docs" / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "AgentSchedule":
                assert errors_of(doc, prices=PRICES) == [], path
