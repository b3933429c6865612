"""`nocturne describe` as people read it (a pure rendering of the schedule and its last runs)."""

from __future__ import annotations

from typing import Any

from nocturne_operator.cli.reports import describe


def schedule(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "daily-ai-news", "namespace": "research"},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "Asia/Tokyo",
            "budget": {"maxPerRunUSD": "0.50", "maxTotalUSD": "15.00", "maxMonthlyUSD": "5.00"},
            **spec,
        },
        "status": {
            "phase": "BudgetExhausted",
            "totalCostUSD": "7.25",
            "thisMonth": {"month": "2026-11", "costUSD": "5.00"},
            "runs": {"succeeded": 12, "failed": 1},
            "consecutiveFailures": 0,
            "conditions": [
                {
                    "type": "BudgetExhausted",
                    "status": "True",
                    "reason": "MonthlyBudgetReached",
                    "message": "resumes automatically at 2026-12-01 00:00 JST (+09:00)",
                }
            ],
        },
    }


def test_budgets_cost_this_month_and_notifications_are_shown() -> None:
    notifications = {
        "webhookSecretRef": {"name": "slack", "key": "url"},
        "events": ["AutoPaused", "Recovered"],
        "format": "slack",
        "cooldownMinutes": 30,
    }
    text = describe(schedule(notifications=notifications), [])
    lines = text.splitlines()
    assert "Budget:        0.50 USD per run, total cap 15.00, monthly cap 5.00" in lines
    assert "Cost to date:  7.25 USD (5.00 USD in 2026-11)" in lines
    assert (
        "Notifications: AutoPaused, Recovered to the webhook in Secret slack (key url), "
        "slack format, cooldown 30 min"
    ) in lines
    assert (
        "  BudgetExhausted=True MonthlyBudgetReached: resumes automatically at "
        "2026-12-01 00:00 JST (+09:00)"
    ) in lines
    assert lines[-1] == "  (none)"


def test_without_caps_or_notifications() -> None:
    obj = schedule()
    obj["spec"]["budget"] = {"maxPerRunUSD": "2.00"}
    del obj["status"]["thisMonth"]
    lines = describe(obj, []).splitlines()
    assert "Budget:        2.00 USD per run, total cap none, monthly cap none" in lines
    assert "Cost to date:  7.25 USD" in lines
    assert "Notifications: none" in lines
