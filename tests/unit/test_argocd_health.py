"""Argo CD: the AgentSchedule health check (helm/argocd/health.lua), run in Lua 5.1 (the
dialect of Argo CD's gopher-lua) against sample objects, and the Application example."""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import tools
from harness.prerequisites import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "helm" / "argocd" / "health.lua"
APPLICATION = REPO / "helm" / "argocd" / "application.yaml"


@functools.cache
def lua_runtime_class() -> Any:
    try:
        from lupa import lua51  # type: ignore[import-untyped]  # noqa: PLC0415 - optional tool
    except ImportError:
        skip_or_fail("the lupa package (Lua 5.1 for Python) is not installed")
    return lua51.LuaRuntime


def to_python(value: Any) -> Any:
    """A Lua table (as lupa returns it) as a dict; other values as they are."""
    if hasattr(value, "items"):
        return {str(k): to_python(v) for k, v in value.items()}
    return value


def health(obj: dict[str, Any]) -> dict[str, Any]:
    """What Argo CD would show for ``obj``: {"status": ..., "message": ...}."""
    lua = lua_runtime_class()(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = to_python(lua.execute(HEALTH_LUA.read_text()))
    assert isinstance(result, dict)
    assert set(result) == {"status", "message"}
    return result


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-26T09:00:00Z",
        "observedGeneration": 2,
    }


def schedule(*conditions: dict[str, Any], suspend: bool = False, **status: Any) -> dict[str, Any]:
    """An AgentSchedule at generation 2 whose status has ``conditions``."""
    obj: dict[str, Any] = {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": "daily-ai-news", "namespace": "research", "generation": 2},
        "spec": {"schedule": "0 9 * * *", "timeZone": "Asia/Tokyo", "suspend": suspend},
        "status": {"observedGeneration": 2, "conditions": list(conditions), **status},
    }
    return obj


READY = condition("Ready", "True", "Reconciled")
NOT_SUSPENDED = condition("Suspended", "False", "NotSuspended")
WITHIN_BUDGET = condition("BudgetExhausted", "False", "WithinBudget")


def test_ready_and_active_is_healthy_with_the_next_run() -> None:
    obj = schedule(READY, NOT_SUSPENDED, WITHIN_BUDGET, nextRunLocal="2026-11-27 09:00 JST")
    assert health(obj) == {"status": "Healthy", "message": "Active; next run 2026-11-27 09:00 JST"}


def test_paused_by_its_owner_is_healthy_with_the_reason() -> None:
    paused = condition("Suspended", "True", "SuspendedByUser", "holiday freeze")
    obj = schedule(READY, paused, WITHIN_BUDGET, suspend=True)
    assert health(obj) == {"status": "Healthy", "message": "Suspended by user: holiday freeze"}


def test_spec_suspend_before_the_condition_flips_is_healthy() -> None:
    obj = schedule(READY, NOT_SUSPENDED, suspend=True)
    assert health(obj)["status"] == "Healthy"
    assert health(obj)["message"].startswith("Suspended by user")


def test_auto_paused_after_consecutive_failures_is_degraded() -> None:
    paused = condition(
        "Suspended", "True", "ConsecutiveFailures", "3 failed runs in a row; fix the cause"
    )
    obj = schedule(READY, paused, WITHIN_BUDGET)
    assert health(obj) == {
        "status": "Degraded",
        "message": "Paused by the operator: 3 failed runs in a row; fix the cause",
    }


def test_exhausted_budget_is_degraded_even_when_also_paused_by_the_user() -> None:
    exhausted = condition("BudgetExhausted", "True", "TotalBudgetReached", "15.02 of 15.00 USD")
    user = condition("Suspended", "True", "SuspendedByUser", "")
    obj = schedule(READY, user, exhausted, suspend=True)
    assert health(obj) == {"status": "Degraded", "message": "Budget exhausted: 15.02 of 15.00 USD"}


def test_a_spent_monthly_budget_is_suspended_until_next_month() -> None:
    message = (
        "cost in 2026-11 20.00 USD reached maxMonthlyUSD 20.00; resumes automatically at "
        "2026-12-01 00:00 JST (+09:00) (or raise spec.budget.maxMonthlyUSD)"
    )
    spent = condition("BudgetExhausted", "True", "MonthlyBudgetReached", message)
    obj = schedule(READY, NOT_SUSPENDED, spent)
    assert health(obj) == {"status": "Suspended", "message": f"Monthly budget spent: {message}"}


def test_a_spent_namespace_budget_is_suspended_until_the_month_turns() -> None:
    message = (
        "namespace team spent 30.00 USD in 2026-11 (UTC), reaching its maxMonthlyUSD 30.00 "
        '(AgentSchedulePolicy "team"); resumes automatically at 2026-12-01 00:00 UTC (+00:00)'
    )
    spent = condition("BudgetExhausted", "True", "NamespaceBudgetReached", message)
    obj = schedule(READY, NOT_SUSPENDED, spent)
    assert health(obj) == {
        "status": "Suspended",
        "message": f"Namespace's monthly budget spent: {message}",
    }


def test_a_silent_stop_is_degraded() -> None:
    message = "no successful run since 2026-11-23 09:00 JST (+09:00); runs were due at ..."
    silent = condition("SilentStop", "True", "NoSuccessfulRun", message)
    obj = schedule(READY, NOT_SUSPENDED, WITHIN_BUDGET, silent)
    assert health(obj) == {"status": "Degraded", "message": f"Silent stop: {message}"}
    quiet = condition("SilentStop", "False", "RunsSucceeding", "watching since ...")
    assert health(schedule(READY, NOT_SUSPENDED, WITHIN_BUDGET, quiet))["status"] == "Healthy"


@pytest.mark.parametrize("reason", ["InvalidSpec", "QuotaExceeded"])
def test_invalid_or_over_quota_is_degraded(reason: str) -> None:
    message = 'spec.schedule "*/5 * * * *": minimum interval is 60 min'
    obj = schedule(condition("Ready", "False", reason, message), NOT_SUSPENDED)
    assert health(obj) == {"status": "Degraded", "message": f"{reason}: {message}"}


def test_no_status_yet_is_progressing() -> None:
    obj = schedule()
    del obj["status"]
    assert health(obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe this schedule",
    }


def test_a_generation_not_yet_observed_is_progressing() -> None:
    obj = schedule(READY, NOT_SUSPENDED)
    obj["metadata"]["generation"] = 3
    assert health(obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 3",
    }


def test_observed_generation_missing_is_progressing() -> None:
    obj = schedule(READY)
    del obj["status"]["observedGeneration"]
    assert health(obj)["status"] == "Progressing"


def test_status_without_a_ready_condition_is_progressing() -> None:
    obj = schedule(NOT_SUSPENDED)
    assert health(obj) == {"status": "Progressing", "message": "Not ready yet"}


def test_ready_false_for_another_reason_is_progressing() -> None:
    obj = schedule(condition("Ready", "False", "Reconciling", "creating the CronJob"))
    assert health(obj) == {
        "status": "Progressing",
        "message": "Not ready yet: creating the CronJob",
    }


def test_empty_conditions_list_is_progressing() -> None:
    # Lua cannot tell an empty JSON array from an empty object; both must work.
    obj = schedule()
    assert health(obj)["status"] == "Progressing"
    obj["status"]["conditions"] = {}
    assert health(obj)["status"] == "Progressing"


def test_the_check_does_not_modify_the_object() -> None:
    obj = schedule(READY, NOT_SUSPENDED)
    before = copy.deepcopy(obj)
    health(obj)
    assert obj == before


# The Application example


def applications() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(APPLICATION.read_text())}


def wave(app: dict[str, Any]) -> int:
    return int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])


def test_the_crd_application_syncs_first_and_is_never_pruned() -> None:
    apps = applications()
    crds, chart = apps["nocturne-crds"], apps["nocturne"]
    assert wave(crds) < wave(chart)
    assert (REPO / crds["spec"]["source"]["path"] / "agentschedules.nocturne.dev.yaml").is_file()
    assert crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    # Deleting the Application must not cascade to the CRD (and so to every AgentSchedule).
    assert "resources-finalizer.argocd.argoproj.io" not in crds["metadata"].get("finalizers", [])
    assert "ServerSideApply=true" in crds["spec"]["syncPolicy"]["syncOptions"]


def test_the_chart_application_skips_crds_and_its_values_pass_the_schema(tmp_path: Path) -> None:
    chart = applications()["nocturne"]
    source = chart["spec"]["source"]
    assert (REPO / source["path"] / "Chart.yaml").is_file()
    assert source["helm"]["skipCrds"] is True
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    try:
        helm = tools.ensure().helm
    except (tools.ToolsError, OSError) as exc:
        skip_or_fail(f"the pinned helm binary is not available: {exc}")
        raise
    result = subprocess.run(
        [str(helm), "template", "nocturne", str(REPO / source["path"]), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
