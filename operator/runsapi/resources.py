"""AgentRun: one run attempt as the agentruns API shows it -- the object, its list, the Table
``kubectl get`` prints, discovery, and metav1.Status errors. Pure: records in, JSON out.

An AgentRun is named ``<schedule>-<run id>`` (the id is the history's, unique for ever), lives
in its schedule's namespace and carries the labels ``nocturne.dev/schedule``, ``nocturne.dev/job``
and ``nocturne.dev/result`` for selectors. Its ``resourceVersion`` is the run's revision (every
write of the row draws a new one); a list's is the history's latest.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from agent_runner.contract import RunOutcome
from nocturne_operator.api.money import usd
from nocturne_operator.api.timestamps import rfc3339
from nocturne_operator.storage import ExecutionRecord

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "LABEL_JOB",
    "LABEL_RESULT",
    "LABEL_SCHEDULE",
    "RESOURCE",
    "VERSION",
    "agent_run",
    "api_group",
    "api_group_list",
    "api_resource_list",
    "parse_name",
    "run_list",
    "run_name",
    "status_error",
    "table",
]

GROUP = "runs.nocturne.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
RESOURCE = "agentruns"
KIND = "AgentRun"
LABEL_SCHEDULE = "nocturne.dev/schedule"
LABEL_JOB = "nocturne.dev/job"
LABEL_RESULT = "nocturne.dev/result"
ANNOTATION_STARTED = "runs.nocturne.dev/started-at"
_UID_NAMESPACE = uuid.UUID("8f6a4b8e-3f0c-4d55-9a55-6b1c8f1d2e77")
_ERROR_CHARS = 4096


def run_name(record: ExecutionRecord) -> str:
    """``<schedule>-<id>``: unique for ever (ids are never reused), readable in a listing."""
    return f"{record.schedule_name}-{record.id}"


def parse_name(name: str) -> tuple[str, int] | None:
    """(schedule, run id) of an AgentRun name, or None when it cannot be one."""
    schedule, _, run_id = name.rpartition("-")
    if not schedule or not run_id.isdigit() or len(run_id) > 19:
        return None
    return schedule, int(run_id)


def _metadata(record: ExecutionRecord) -> dict[str, Any]:
    return {
        "name": run_name(record),
        "namespace": record.namespace,
        # Stable per run: the same run is the same object in every listing.
        "uid": str(uuid.uuid5(_UID_NAMESPACE, str(record.id))),
        "resourceVersion": str(record.revision),
        "creationTimestamp": rfc3339(record.started_at),
        # The start to the microsecond (timestamps are whole seconds): a page's cursor.
        "annotations": {ANNOTATION_STARTED: record.started_at.isoformat()},
        "labels": {
            LABEL_SCHEDULE: record.schedule_name,
            LABEL_JOB: record.job_name,
            LABEL_RESULT: record.status.display,
        },
    }


def _duration(record: ExecutionRecord) -> float | None:
    if record.completed_at is None:
        return None
    return round((record.completed_at - record.started_at).total_seconds(), 3)


def agent_run(record: ExecutionRecord, *, with_output: bool = False) -> dict[str, Any]:
    """The AgentRun of one attempt; its output only when asked (a ``get`` of one run)."""
    steps = record.metadata.get("steps")
    status: dict[str, Any] = {
        "result": record.status.display,
        "startedAt": rfc3339(record.started_at),
        "costUSD": usd(record.cost_usd),
        "inputTokens": record.input_tokens,
        "outputTokens": record.output_tokens,
        "alert": record.alert,
    }
    optional: dict[str, Any] = {
        "completedAt": rfc3339(record.completed_at) if record.completed_at else None,
        "durationSeconds": _duration(record),
        "alertReason": record.alert_reason,
        "error": record.error[:_ERROR_CHARS] if record.error else None,
        "steps": steps if isinstance(steps, int) else None,
        "output": record.output if with_output else None,
    }
    status.update({k: v for k, v in optional.items() if v is not None})
    if with_output:  # what `nocturne show` prints about the steps
        for key in ("refusals", "toolCalls", "resumedFromStep"):
            value = record.metadata.get(key)
            if value:
                status[key] = value
    spec: dict[str, Any] = {
        "schedule": record.schedule_name,
        "scheduleUID": record.schedule_uid,
        "job": record.job_name,
        "jobUID": record.job_uid,
        "attempt": record.attempt,
        "model": record.model,
        "provider": record.provider,
    }
    if record.manual_request:
        spec["manualRequest"] = record.manual_request
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(record),
        "spec": spec,
        "status": status,
    }


def run_list(
    records: Iterable[ExecutionRecord], *, resource_version: int, continue_token: str | None
) -> dict[str, Any]:
    """An AgentRunList."""
    metadata: dict[str, Any] = {"resourceVersion": str(resource_version)}
    if continue_token:
        metadata["continue"] = continue_token
    return {
        "apiVersion": API_VERSION,
        "kind": f"{KIND}List",
        "metadata": metadata,
        "items": [agent_run(r) for r in records],
    }


_COLUMNS = [
    ("Name", "string", "name", "The run: <schedule>-<id>."),
    ("Schedule", "string", "", "The AgentSchedule."),
    ("Job", "string", "", "The Job of the run."),
    ("Attempt", "integer", "", "Which attempt of the Job (0 first)."),
    ("Result", "string", "", "Running, Succeeded, Failed, TimedOut, BudgetExceeded, Cancelled."),
    ("Cost USD", "string", "", "What the attempt cost."),
    ("Duration", "string", "", "How long the attempt took."),
    ("Age", "date", "", "When the attempt started."),
]


def _age(record: ExecutionRecord, now: datetime) -> str:
    seconds = max(0, int((now - record.started_at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * 2:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cells(record: ExecutionRecord, now: datetime) -> list[Any]:
    duration = _duration(record)
    return [
        run_name(record),
        record.schedule_name,
        record.job_name,
        record.attempt,
        record.status.display,
        usd(record.cost_usd),
        "" if duration is None else f"{duration:.0f}s",
        _age(record, now),
    ]


def table(
    records: Iterable[ExecutionRecord],
    *,
    now: datetime,
    include_object: str,
    resource_version: int,
    continue_token: str | None = None,
) -> dict[str, Any]:
    """The meta.k8s.io/v1 Table ``kubectl get`` asks for; each row carries the object as
    ``include_object`` says (``Metadata``, the default; ``Object``; ``None``)."""
    rows = []
    for record in records:
        row: dict[str, Any] = {"cells": _cells(record, now)}
        if include_object == "Object":
            row["object"] = agent_run(record)
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": _metadata(record),
            }
        rows.append(row)
    metadata: dict[str, Any] = {"resourceVersion": str(resource_version)}
    if continue_token:
        metadata["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": d, "priority": 0}
            for n, t, f, d in _COLUMNS
        ],
        "rows": rows,
    }


def api_resource_list() -> dict[str, Any]:
    """Discovery of the group version: one resource, read-only."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": API_VERSION,
        "resources": [
            {
                "name": RESOURCE,
                "singularName": "agentrun",
                "namespaced": True,
                "kind": KIND,
                "verbs": ["get", "list", "watch"],
                "shortNames": ["aruns"],
                "categories": ["nocturne"],
            }
        ],
    }


def api_group() -> dict[str, Any]:
    version = {"groupVersion": API_VERSION, "version": VERSION}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [version],
        "preferredVersion": version,
    }


def api_group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group()]}


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    410: "Expired",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def status_error(
    code: int, message: str, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A metav1.Status failure, as every Kubernetes API answers an error."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        status["details"] = dict(details)
    return status


def result_of(display: str) -> RunOutcome | None:
    """The outcome a ``result`` label value names (``Succeeded``), or None."""
    return next((o for o in RunOutcome if o.display == display), None)
