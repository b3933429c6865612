"""The bodies a webhook receives, rendered from a stored notice (pure functions): a generic,
versioned JSON document, or a Slack incoming-webhook message with Block Kit sections."""

from __future__ import annotations

from typing import Any

from nocturne_operator.api.timestamps import rfc3339
from nocturne_operator.notifications.notices import Delivery, Kind, first_line

BODY_VERSION = "nocturne.dev/v1"
# Slack's limits: a header's plain text, a section's mrkdwn text.
SLACK_HEADER_LIMIT = 150
SLACK_TEXT_LIMIT = 3000
_SUMMARY_LIMIT = 300


# --------------------------------------------------------------------------------------------
# Bodies (pure)

_TITLES: dict[Kind, tuple[str, str]] = {
    Kind.SUCCEEDED: ("✅", "Succeeded"),
    Kind.FAILED: ("❌", "Failed"),
    Kind.BUDGET_EXCEEDED: ("💸", "Budget exceeded"),
    Kind.AUTO_PAUSED: ("⏸️", "Auto-paused"),
    Kind.RECOVERED: ("✅", "Recovered"),
    Kind.SILENT_STOP: ("🔕", "Silent stop"),
    Kind.ALERT: ("🚨", "Alert"),
}


def _title(delivery: Delivery) -> tuple[str, str]:
    if delivery.kind is Kind.ALERT and delivery.resolved:
        return "✅", "Alert cleared"
    return _TITLES[delivery.kind]


def _summary(delivery: Delivery) -> str:
    """One line: what happened to which schedule."""
    _, title = _title(delivery)
    line = (
        f"{title}: {delivery.namespace}/{delivery.schedule_name}: "
        f"{first_line(delivery.message, _SUMMARY_LIMIT)}"
    )
    return line if len(line) <= _SUMMARY_LIMIT else line[: _SUMMARY_LIMIT - 1] + "…"


def json_body(delivery: Delivery) -> dict[str, Any]:
    """The ``json`` format: a versioned document with a one-line ``text`` for chat tools."""
    run = delivery.run
    return {
        "version": BODY_VERSION,
        "id": delivery.id,
        "kind": delivery.kind.value,
        "state": "resolved" if delivery.resolved else "firing",
        "schedule": {
            "namespace": delivery.namespace,
            "name": delivery.schedule_name,
            "uid": delivery.schedule_uid,
        },
        "message": delivery.message,
        "at": rfc3339(delivery.created_at),
        "run": dict(run) if run is not None else None,
        "text": _summary(delivery),
    }


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn needs exactly these three escaped; everything else is literal.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fit(escaped: str, limit: int, marker: str) -> str:
    """``escaped`` cut to ``limit`` characters with ``marker``, never inside an entity."""
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: max(0, limit - len(marker))]
    amp = cut.rfind("&", max(0, len(cut) - 5))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + marker


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _labelled(label: str, text: str, marker: str, *, code: bool = False) -> dict[str, Any]:
    """A section ``*label*`` + text, the text cut so the whole stays within Slack's limit."""
    head = f"*{label}*\n"
    fence = "```" if code else ""
    room = SLACK_TEXT_LIMIT - len(head) - 2 * len(fence)
    return _section(f"{head}{fence}{_fit(_slack_escape(text), room, marker)}{fence}")


def slack_body(delivery: Delivery) -> dict[str, Any]:
    """The ``slack`` format: an incoming-webhook message (fallback ``text`` and blocks).

    Header ≤150 characters, each section ≤3000; agent text is escaped (&, <, >) and long output
    is cut with a marker pointing at ``nocturne history``.
    """
    emoji, title = _title(delivery)
    run = delivery.run
    where = f"nocturne history {delivery.schedule_name} -n {delivery.namespace}"
    header = f"{emoji} {title}: {delivery.schedule_name}"
    if len(header) > SLACK_HEADER_LIMIT:
        header = header[: SLACK_HEADER_LIMIT - 1] + "…"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        _section(_fit(_slack_escape(delivery.message), SLACK_TEXT_LIMIT, "…")),
    ]
    facts = [f"Namespace `{_slack_escape(delivery.namespace)}`"]
    if run is not None:
        facts.append(f"Job `{_slack_escape(str(run.get('job', '')))}`")
        facts.append(f"Result *{_slack_escape(str(run.get('result', '')))}*")
        facts.append(f"Cost ${_slack_escape(str(run.get('costUSD', '')))}")
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _fit(" · ".join(facts), 3000, "…")}],
        }
    )
    if run is not None and not delivery.resolved:
        error, output, reason = run.get("error"), run.get("output"), run.get("alertReason")
        if delivery.kind is Kind.FAILED and error:
            marker = f"… (truncated, full error: {where})"
            blocks.append(_labelled("Error", str(error), marker, code=True))
        if delivery.kind is Kind.ALERT and reason:
            blocks.append(_labelled("Alert reason", str(reason), "…"))
        if delivery.kind in (Kind.SUCCEEDED, Kind.ALERT) and output:
            marker = f"\n… (truncated, full output: {where})"
            blocks.append(_labelled("Output", str(output), marker))
    return {"text": _slack_escape(_summary(delivery)), "blocks": blocks}


def render_body(delivery: Delivery) -> dict[str, Any]:
    """The body in the notice's format."""
    return slack_body(delivery) if delivery.format == "slack" else json_body(delivery)
