"""The run API's HTTP server (aiohttp, TLS): start = budget grant, progress, checkpoint,
finish.

Every request is authenticated first (``auth``), then its body is parsed with the wire contract
(``agent_runner.contract``), then its RunRef is checked against the token's run. Budgets are
reserved centrally by ``History.reserve`` under a per-schedule lock; without the database there
is no grant (503: the runner spends nothing). Caps, model and zone come from the Job's task
snapshot, never from the runner. Tokens, request bodies and agent output are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent_runner.contract import (
    CHECKPOINT_LIMIT_BYTES,
    CHECKPOINT_PATH,
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    Ack,
    ApiError,
    Checkpoint,
    CheckpointReport,
    FinishReport,
    Grant,
    PreviousRun,
    ProgressReport,
    StartRequest,
    describe_validation_error,
)
from nocturne_operator.prices import PriceTable, PriceTableError
from nocturne_operator.runapi import metrics
from nocturne_operator.runapi.auth import RefusalError, RunAuthenticator, RunIdentity, check_run
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.settings import Settings
from nocturne_operator.storage import (
    Caps,
    ExecutionKey,
    ExecutionNotFoundError,
    History,
    HistoryError,
    HistoryUnavailableError,
    StateTooLargeError,
    StateToSave,
    month_start,
)

__all__ = [
    "FINISH_LIMIT_BYTES",
    "HEALTH_PATH",
    "REPORT_LIMIT_BYTES",
    "RunObserver",
    "make_app",
    "serve",
]

log = logging.getLogger(__name__)

REPORT_LIMIT_BYTES = 64 * 1024
"""Largest start or progress body."""
FINISH_LIMIT_BYTES = 8 * 1024 * 1024
"""Largest finish body (output up to 4 MiB as JSON text, escapes included, plus state)."""
HEALTH_PATH = "/healthz"
# A runner's startedAt is its own word: it is kept within this window before the server's clock,
# so no attempt can date itself into an earlier month (outside the monthly cap's sum).
_START_SKEW = timedelta(minutes=15)
_TOKEN_LIMIT = 16 * 1024
_OWNERS_KEPT = 20_000  # executions whose owner is remembered (a few hundred runs at a time)
# Fields whose values are agent output or state: never echoed in an error message.
_SECRET_FIELDS = frozenset(
    {"output", "error", "state", "metadata", "alertReason", "activity", "checkpoint"}
)

Clock = Callable[[], datetime]
OnWrite = Callable[[str], None]
"""(schedule UID) after a run of the schedule was written: its statistics changed."""
BeforeGrant = Callable[[RunIdentity], object]
"""(the attempt asking) before its grant: settle the Job's attempts whose pods ended (blocking:
it is called in a worker thread)."""
_Doc = TypeVar("_Doc", StartRequest, ProgressReport, CheckpointReport, FinishReport)


class RunObserver(Protocol):
    """Hears of the runs the API serves, once each report is recorded (e.g. for
    ``status.activeRun``). Called on the event loop: must not block."""

    def started(self, identity: RunIdentity, grant: Grant) -> None:
        """An attempt got its grant."""

    def progressed(self, identity: RunIdentity, report: ProgressReport) -> None:
        """An attempt reported its cost so far and what it does now."""

    def finished(self, identity: RunIdentity, report: FinishReport) -> None:
        """An attempt reported its end."""


def _error(status: int, reason: str, message: str) -> web.Response:
    body = ApiError(reason=reason, message=message[:4096]).model_dump_json(by_alias=True)
    return web.Response(status=status, text=body, content_type="application/json")


def _ok(document: BaseModel) -> web.Response:
    return web.Response(
        text=document.model_dump_json(by_alias=True), content_type="application/json"
    )


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _TOKEN_LIMIT:
        raise RefusalError(
            401, "Unauthenticated", "a bearer token (the runner's projected token) is required"
        )
    return token


async def _body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    too_large = RefusalError(413, "RequestTooLarge", f"the request body is over {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _no_database() -> RefusalError:
    return RefusalError(503, "HistoryUnavailable", "the operator has no history database: no grant")


def _parse(model: type[_Doc], body: bytes) -> _Doc:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        message = describe_validation_error(exc, secret_fields=_SECRET_FIELDS)
        raise RefusalError(400, "BadRequest", f"{model.__name__}: {message}") from None


def make_app(
    *,
    authenticator: RunAuthenticator,
    history: History | None,
    prices: PriceTable,
    settings: Settings,
    clock: Clock = lambda: datetime.now(UTC),
    observer: RunObserver | None = None,
    on_write: OnWrite | None = None,
    before_grant: BeforeGrant | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> web.Application:
    """The run API as an aiohttp application. ``history`` None: every start is refused with
    503 (no grant without the database). ``observer`` (optional) hears of every recorded
    start, progress report and finish; ``on_write`` (sync, must not block) of every write of a
    schedule's runs (start, progress, finish); ``before_grant`` is called before every grant
    (in a thread; a failure is logged and the grant goes on); ``ready`` False makes the health
    path answer 503 (draining)."""
    app = web.Application(client_max_size=FINISH_LIMIT_BYTES + 1024)
    api = _RunApi(authenticator, history, prices, settings, clock, observer, on_write, before_grant)
    app.router.add_post(START_PATH, _endpoint("start", REPORT_LIMIT_BYTES, api.start))
    app.router.add_post(PROGRESS_PATH, _endpoint("progress", REPORT_LIMIT_BYTES, api.progress))
    app.router.add_post(
        CHECKPOINT_PATH, _endpoint("checkpoint", CHECKPOINT_LIMIT_BYTES + 4096, api.checkpoint)
    )
    app.router.add_post(FINISH_PATH, _endpoint("finish", FINISH_LIMIT_BYTES, api.finish))
    app.router.add_get(HEALTH_PATH, _health(ready))
    return app


def _health(ready: Callable[[], bool]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The readiness of this replica's run API (the chart's readinessProbe): 200 while it
    serves, 503 once it is draining before a shutdown (the Service then sends reports to the
    other replica). Leadership does not count: every replica serves reports."""

    async def health(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ok")
        return web.Response(status=503, text="draining")

    return health


def _endpoint(
    name: str, limit: int, handle: Callable[[str, bytes], Awaitable[BaseModel]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        began = time.perf_counter()
        response: web.Response
        try:
            token = _bearer(request)
            body = await _body(request, limit)
            response = _ok(await handle(token, body))
        except RefusalError as exc:
            response = _error(exc.status, exc.reason, exc.message)
        except Exception:
            log.exception("run API %s: unexpected error", name)
            response = _error(500, "InternalError", "the operator failed to handle the request")
        metrics.observe(name, response.status, time.perf_counter() - began)
        return response

    return handler


class _RunApi:
    def __init__(  # noqa: PLR0917 - one private call site
        self,
        authenticator: RunAuthenticator,
        history: History | None,
        prices: PriceTable,
        settings: Settings,
        clock: Clock,
        observer: RunObserver | None,
        on_write: OnWrite | None,
        before_grant: BeforeGrant | None,
    ) -> None:
        self.authenticator = authenticator
        self.history = history
        self.prices = prices
        self.settings = settings
        # execution id -> (Job UID, pod UID): a row's owner never changes, so a run's reports
        # after its first are checked without a database read.
        self._owners: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self.clock = clock
        self.observer = observer
        self.on_write = on_write
        self.before_grant = before_grant

    async def _identity(
        self, token: str, body: bytes, model: type[_Doc]
    ) -> tuple[RunIdentity, _Doc]:
        # Identity first: an unauthenticated caller learns nothing about bodies or runs.
        identity = await self.authenticator.identify(token)
        document = _parse(model, body)
        check_run(identity, document.run)
        return identity, document

    async def _history_call(
        self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        history = self.history
        if history is None:
            raise _no_database()
        try:
            return await asyncio.to_thread(call, history, *args, **kwargs)
        except HistoryUnavailableError as exc:
            log.warning("run API %s: %s", what, exc)
            raise RefusalError(
                503, "HistoryUnavailable", "the history database is unreachable: try again later"
            ) from None
        except StateTooLargeError:
            raise
        except ExecutionNotFoundError:
            raise RefusalError(
                403, "Forbidden", "the execution does not belong to this run"
            ) from None
        except HistoryError as exc:
            log.error("run API %s: %s", what, exc)  # noqa: TRY400 - the message says it all
            raise RefusalError(
                500, "HistoryError", f"{what} failed in the history database"
            ) from None

    # ---- start ---------------------------------------------------------------------------

    async def start(self, token: str, body: bytes) -> BaseModel:
        identity, request = await self._identity(token, body, StartRequest)
        if self.history is None:  # before the price: no database, no grant, whatever the model
            raise _no_database()
        task = identity.task
        try:
            price = self.prices.lookup(task.agent.provider, task.agent.model)
        except PriceTableError as exc:
            raise RefusalError(422, "UnknownModel", str(exc)) from None
        now = self.clock()
        started_at = min(max(request.started_at, now - _START_SKEW), now)
        budget = task.budget
        monthly = budget.max_monthly_usd
        caps = Caps(
            # The cluster's cap, unless the namespace's policy sets its own (reserve() reads it).
            per_run=min(budget.max_per_run_usd, self.settings.max_per_run_usd),
            total=budget.max_total_usd,
            monthly=monthly,
            month_start=month_start(now, task.time_zone) if monthly is not None else None,
            asked=budget.max_per_run_usd,
        )
        key = ExecutionKey(
            namespace=identity.namespace,
            schedule_name=identity.schedule,
            schedule_uid=identity.schedule_uid,
            job_name=identity.job_name,
            job_uid=identity.job_uid,
            pod_uid=identity.pod_uid,
            attempt=0,  # reserve() numbers the Job's attempts itself
            manual_request=identity.manual_request,
        )
        where = f"{identity.namespace}/{identity.schedule} job {identity.job_name}"
        if self.before_grant is not None:
            try:
                await asyncio.to_thread(self.before_grant, identity)
            except Exception as exc:
                # The grant goes on: an earlier attempt still held counts at its whole grant.
                log.warning("run API: settling the earlier attempts of %s failed: %s", where, exc)
        grant = await self._history_write(
            identity,
            f"reserve a budget for {where}",
            History.reserve,
            key,
            model=task.agent.model,
            provider=task.agent.provider,
            started_at=started_at,
            caps=caps,
        )
        if grant.refused is not None:
            log.info("run API: no grant for %s: %s", where, grant.refused)
            raise RefusalError(
                409, grant.refused, grant.message or f"no budget left ({grant.refused})"
            )
        saved = await self._history_call(
            f"load the agent state of {where}",
            History.load_state,
            identity.namespace,
            identity.schedule,
            task.task.state_key or "",
            schedule_uid=identity.schedule_uid,
        )
        previous = None if saved is None else PreviousRun(state=saved.state, output=saved.output)
        resume = await self._resume(identity, grant.attempt)
        log.info(
            "run API: granted %s USD to %s attempt %d (execution %d)",
            grant.limit,
            where,
            grant.attempt,
            grant.execution_id,
        )
        answer = Grant(
            execution_id=grant.execution_id,
            attempt=grant.attempt,
            limit_usd=grant.limit,
            spent_before_usd=grant.spent_before,
            price=price,
            previous=previous,
            resume=resume,
        )
        self._observe(lambda observer: observer.started(identity, answer))
        return answer

    async def _resume(self, identity: RunIdentity, attempt: int) -> Checkpoint | None:
        """The Job's last checkpoint for a retry (none for a first attempt). One that no longer
        reads as a checkpoint (an older runner's) is not handed over: the retry starts over."""
        if attempt == 0:
            return None
        saved = await self._history_call(
            f"load the checkpoint of Job {identity.job_name}",
            History.load_checkpoint,
            identity.job_uid,
        )
        if saved is None:
            return None
        try:
            return Checkpoint.model_validate(saved)
        except ValidationError:
            log.warning(
                "run API: the checkpoint of Job %s is unreadable: ignored", identity.job_name
            )
            return None

    def _observe(self, tell: Callable[[RunObserver], None]) -> None:
        if self.observer is None:
            return
        try:
            tell(self.observer)
        except Exception:
            log.exception("run API: the run observer failed")

    async def _history_write(
        self,
        identity: RunIdentity,
        what: str,
        call: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """``_history_call`` for a write of the identity's runs; ``on_write`` hears of it
        whatever its outcome (a failed write may have landed)."""
        try:
            return await self._history_call(what, call, *args, **kwargs)
        finally:
            if self.on_write is not None:
                try:
                    self.on_write(identity.schedule_uid)
                except Exception:
                    log.exception("run API: the write observer failed")

    # ---- progress and finish -------------------------------------------------------------

    async def _own_execution(self, identity: RunIdentity, execution_id: int) -> None:
        owner = self._owners.get(execution_id)
        if owner is None:
            record = await self._history_call(
                f"read execution {execution_id}", History.get, execution_id, include_output=False
            )
            if record is not None:
                owner = (record.job_uid, record.pod_uid)
                self._owners[execution_id] = owner
                while len(self._owners) > _OWNERS_KEPT:
                    self._owners.popitem(last=False)
        else:
            self._owners.move_to_end(execution_id)
        if owner != (identity.job_uid, identity.pod_uid):
            raise RefusalError(403, "Forbidden", "the execution does not belong to this run")

    async def progress(self, token: str, body: bytes) -> BaseModel:
        identity, report = await self._identity(token, body, ProgressReport)
        await self._own_execution(identity, report.execution_id)
        await self._history_write(
            identity,
            f"record progress of execution {report.execution_id}",
            History.record_progress,
            report.execution_id,
            cost_usd=report.cost_usd,
            input_tokens=report.input_tokens,
            output_tokens=report.output_tokens,
            reserved_usd=report.reserved_usd,
        )
        self._observe(lambda observer: observer.progressed(identity, report))
        return Ack()

    async def checkpoint(self, token: str, body: bytes) -> BaseModel:
        identity, report = await self._identity(token, body, CheckpointReport)
        await self._own_execution(identity, report.execution_id)
        checkpoint = report.checkpoint
        kept = await self._history_call(
            f"save the checkpoint of execution {report.execution_id}",
            History.save_checkpoint,
            report.execution_id,
            checkpoint.step,
            checkpoint.model_dump(mode="json"),
        )
        return Ack(recorded=bool(kept))

    async def finish(self, token: str, body: bytes) -> BaseModel:
        identity, report = await self._identity(token, body, FinishReport)
        await self._own_execution(identity, report.execution_id)
        saving = None
        refused_state: StateTooLargeError | None = None
        if report.state is not None:
            saving = StateToSave(
                identity.namespace,
                identity.schedule,
                identity.task.task.state_key or "",
                identity.schedule_uid,
                report.state,
                report.output,
            )
            try:
                saving.validate()
            except StateTooLargeError as exc:
                saving, refused_state = None, exc  # the run is recorded all the same
        # The state is saved with a recorded success only (not with a run the reaper already
        # finished otherwise), in the same transaction.
        await self._history_write(
            identity,
            f"finish execution {report.execution_id}",
            History.finish,
            report.execution_id,
            status=report.status,
            completed_at=report.completed_at,
            cost_usd=report.cost_usd,
            input_tokens=report.input_tokens,
            output_tokens=report.output_tokens,
            output=report.output,
            error=report.error,
            alert=report.alert,
            alert_reason=report.alert_reason,
            metadata=report.metadata,
            saving=saving,
        )
        self._observe(lambda observer: observer.finished(identity, report))
        if refused_state is not None:
            raise RefusalError(
                422, "StateTooLarge", f"the run was recorded, its state was not: {refused_state}"
            )
        return Ack()


async def serve(
    app: web.Application,
    settings: Settings,
    tls: RunApiTls,
    *,
    context: ssl.SSLContext | None = None,
) -> web.AppRunner:
    """Serve ``app`` over TLS on run_api_bind:run_api_port; stop it with ``runner.cleanup()``.
    Pass ``context`` (``tls.server_context()``) to renew the certificate later in place."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.run_api_bind,
        settings.run_api_port,
        ssl_context=context or tls.server_context(),
        reuse_address=True,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info(
        "run API listening on %s:%d (TLS, names %s)",
        settings.run_api_bind,
        settings.run_api_port,
        ", ".join(sorted(tls.hostnames)),
    )
    return runner
