"""The CLI's run history through the agentruns API (issue 17): what ``nocturne history``,
``show``, ``cost`` and ``describe`` read by default, with the user's kubeconfig and RBAC -- no
database credential. ``ApiRuns`` answers the few reads those commands make of ``History``
(``runs``, ``get``, ``cost``), for one schedule, from AgentRuns.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from kubernetes.client.exceptions import ApiException

from agent_runner.contract import RunOutcome
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.api.timestamps import parse_rfc3339, rfc3339
from nocturne_operator.runsapi import resources as res
from nocturne_operator.runsapi.selectors import encode_continue
from nocturne_operator.storage import CostPeriod, ExecutionRecord, HistoryError

__all__ = ["ApiRuns", "RunsApiError", "from_agent_run"]

_PAGE = 1000


class RunsApiError(HistoryError):
    """The agentruns API refused or failed a read; the message is the apiserver's."""


def from_agent_run(obj: Mapping[str, Any]) -> ExecutionRecord:
    """An AgentRun as the history record the CLI's reports print."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    parsed = res.parse_name(str(meta["name"]))
    outcome = res.result_of(str(status.get("result", "")))
    if parsed is None or outcome is None:
        raise RunsApiError(f"the agentruns API answered an object that is not a run: {meta!r}")
    metadata: dict[str, Any] = {
        k: status[k] for k in ("steps", "refusals", "toolCalls", "resumedFromStep") if k in status
    }
    precise = (meta.get("annotations") or {}).get(res.ANNOTATION_STARTED)
    started = parse_rfc3339(str(precise or status["startedAt"]))
    completed = status.get("completedAt")
    return ExecutionRecord(
        id=parsed[1],
        namespace=str(meta["namespace"]),
        schedule_name=str(spec.get("schedule", parsed[0])),
        schedule_uid=str(spec.get("scheduleUID", "")),
        job_name=str(spec.get("job", "")),
        job_uid=str(spec.get("jobUID", "")),
        pod_uid="",
        attempt=int(spec.get("attempt", 0)),
        manual_request=spec.get("manualRequest"),
        status=outcome,
        started_at=started,
        completed_at=parse_rfc3339(str(completed)) if completed else None,
        cost_usd=Decimal(str(status.get("costUSD", "0"))),
        input_tokens=int(status.get("inputTokens", 0)),
        output_tokens=int(status.get("outputTokens", 0)),
        model=str(spec.get("model", "")),
        provider=str(spec.get("provider", "")),
        error=status.get("error"),
        output=status.get("output"),
        alert=bool(status.get("alert", False)),
        alert_reason=status.get("alertReason"),
        metadata=metadata,
        updated_at=started,
        revision=int(meta.get("resourceVersion") or 0),
    )


class ApiRuns:
    """The runs of one schedule through the agentruns API."""

    def __init__(self, kube: Kube, namespace: str, schedule: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.schedule = schedule
        self.base = f"/apis/{res.API_VERSION}/namespaces/{quote(namespace, safe='')}/{res.RESOURCE}"

    def __enter__(self) -> ApiRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _read(self, path: str, query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        try:
            return self.kube.read(path, query)
        except ApiException as exc:
            raise RunsApiError(_message(exc)) from None

    def get(self, execution_id: int, *, include_output: bool = True) -> ExecutionRecord | None:
        """One run of the schedule by id (with its output), or None."""
        del include_output
        name = f"{self.schedule}-{execution_id}"
        try:
            found = self.kube.read(f"{self.base}/{quote(name, safe='')}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise RunsApiError(_message(exc)) from None
        return from_agent_run(found)

    def runs(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: RunOutcome | str | Collection[RunOutcome | str] | None = None,
        limit: int = 50,
        before_id: int | None = None,
        include_output: bool = False,
        job_name: str | None = None,
    ) -> list[ExecutionRecord]:
        """Runs of the schedule, newest first, as ``History.runs`` answers (a page after
        ``before_id``); with ``include_output`` each is read whole."""
        del namespace, schedule_name  # the scope is this object's
        labels = [f"{res.LABEL_SCHEDULE}={self.schedule}"]
        if job_name is not None:
            labels.append(f"{res.LABEL_JOB}={job_name}")
        if status is not None:
            wanted = [status] if isinstance(status, str | RunOutcome) else list(status)
            labels.append(
                f"{res.LABEL_RESULT} in ({','.join(RunOutcome(s).display for s in wanted)})"
            )
        fields = []
        if since is not None:
            fields.append(f"status.startedAfter={rfc3339(since)}")
        if until is not None:
            fields.append(f"status.startedBefore={rfc3339(until)}")
        query = [("labelSelector", ",".join(labels)), ("limit", str(limit))]
        if fields:
            query.append(("fieldSelector", ",".join(fields)))
        if before_id is not None:
            cursor = self.get(before_id, include_output=False)
            if cursor is None:
                raise ValueError(
                    f"before_id: {before_id} is not a run of {self.namespace}/{self.schedule}"
                )
            query.append(("continue", encode_continue(cursor.started_at, cursor.id)))
        page = self._read(self.base, query)
        records = [from_agent_run(item) for item in page.get("items") or []]
        if include_output:
            records = [self.get(r.id) or r for r in records]
        return records

    def cost(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "day",
        tz: str = "UTC",
    ) -> list[CostPeriod]:
        """What ``History.cost`` answers, summed here over every run in the range (read a
        thousand at a time): per day, week (from Monday) or month in ``tz``."""
        del namespace, schedule_name
        if by not in ("day", "week", "month"):
            raise ValueError(f"by: {by!r} must be one of day, week, month")
        zone = ZoneInfo(tz)
        totals: dict[datetime, Decimal] = defaultdict(Decimal)
        fields = [f"spec.schedule={self.schedule}"]
        if since is not None:
            fields.append(f"status.startedAfter={rfc3339(since)}")
        if until is not None:
            fields.append(f"status.startedBefore={rfc3339(until)}")
        query = [("fieldSelector", ",".join(fields)), ("limit", str(_PAGE))]
        token = ""
        while True:
            page = self._read(self.base, query + ([("continue", token)] if token else []))
            for item in page.get("items") or []:
                run = from_agent_run(item)
                totals[_period(run.started_at.astimezone(zone), by)] += run.cost_usd
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                break
        return [CostPeriod(start, totals[start]) for start in sorted(totals)]


def _period(local: datetime, by: str) -> datetime:
    """The start (local midnight) of the day, week (Monday) or month ``local`` falls in."""
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if by == "week":
        day -= timedelta(days=day.weekday())
    elif by == "month":
        day = day.replace(day=1)
    # Re-localise: midnight's offset may differ from the moment's (a DST change in between).
    zone = local.tzinfo
    return day.replace(tzinfo=None).replace(tzinfo=zone)


def _message(exc: ApiException) -> str:
    """The apiserver's own message (a metav1.Status), else the HTTP status."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    if exc.status == 404 and not message:
        message = "the agentruns API is not installed (no APIService v1alpha1.runs.nocturne.dev)"
    return f"agentruns API: {message or f'HTTP {exc.status} {exc.reason}'}"
