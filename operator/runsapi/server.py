"""The agentruns API's HTTP server (aiohttp, TLS): discovery, ``get``, ``list`` (selectors,
``limit``/``continue``, the Table format) and ``watch`` of AgentRuns, read from PostgreSQL.

Every request but the health checks must come from the kube-apiserver's front proxy
(``auth.FrontProxy``); discovery is open to any user it authenticated, resources need a
SubjectAccessReview's yes (``auth.AccessReviews``). Only GET exists: the history is written by
the operator alone. Errors are metav1.Status documents, as kubectl expects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from nocturne_operator.runsapi import resources as res
from nocturne_operator.runsapi.auth import AccessReviews, FrontProxy, User
from nocturne_operator.runsapi.changes import RunChanges
from nocturne_operator.runsapi.selectors import (
    Selection,
    SelectorError,
    decode_continue,
    encode_continue,
    select,
)
from nocturne_operator.storage import (
    ExecutionRecord,
    History,
    HistoryError,
    HistoryUnavailableError,
)

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "make_app", "serve"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 500
"""A list without ``limit`` gets at most this many items and a ``continue`` token."""
MAX_LIMIT = 1000
_WATCH_DEFAULT_SECONDS = 1800
_WATCH_MAX_SECONDS = 3600
# A write still in flight may commit a revision below the largest one seen; writes are short
# (statement timeout 15 s), so a watcher looks back this far before it calls a revision done.
SETTLE = timedelta(seconds=60)
_BASE = f"/apis/{res.GROUP}/{res.VERSION}"
_TABLE = "as=Table"


class _FailureError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status(code: int, message: str) -> web.Response:
    return web.json_response(res.status_error(code, message), status=code)


def make_app(
    *,
    history: History | None,
    front_proxy: Callable[[], FrontProxy | None],
    reviews: AccessReviews,
    changes: RunChanges,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> web.Application:
    """The agentruns API. ``front_proxy`` gives the request-header settings now (None: not
    known yet, every resource request is 503)."""
    api = _RunsApi(history, front_proxy, reviews, changes, clock)
    app = web.Application()
    for path in ("/healthz", "/livez", "/readyz"):
        app.router.add_get(path, _health)
    # The aggregator downloads every API's OpenAPI document; agentruns describe themselves by
    # discovery and Tables only, so both versions answer with an empty one.
    app.router.add_get("/openapi/v2", api.guard(api.openapi_v2))
    app.router.add_get("/openapi/v3", api.guard(api.openapi_v3))
    app.router.add_route("*", "/apis", api.guard(api.group_list))
    app.router.add_route("*", f"/apis/{res.GROUP}", api.guard(api.group))
    app.router.add_route("*", _BASE, api.guard(api.resource_list))
    app.router.add_route("*", f"{_BASE}/{res.RESOURCE}", api.guard(api.collection))
    app.router.add_route(
        "*", f"{_BASE}/namespaces/{{namespace}}/{res.RESOURCE}", api.guard(api.collection)
    )
    app.router.add_route(
        "*", f"{_BASE}/namespaces/{{namespace}}/{res.RESOURCE}/{{name}}", api.guard(api.one)
    )
    return app


async def _health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


Handler = Callable[[web.Request, User], Awaitable[web.StreamResponse]]


class _RunsApi:
    def __init__(
        self,
        history: History | None,
        front_proxy: Callable[[], FrontProxy | None],
        reviews: AccessReviews,
        changes: RunChanges,
        clock: Callable[[], datetime],
    ) -> None:
        self.history = history
        self.front_proxy = front_proxy
        self.reviews = reviews
        self.changes = changes
        self.clock = clock

    def guard(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Authenticate (the front proxy), allow GET only, turn failures into Status."""

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request, self._user(request))
            except _FailureError as exc:
                return _status(exc.code, exc.message)
            except SelectorError as exc:
                return _status(400, str(exc))
            except HistoryUnavailableError:
                return _status(503, "the run history database is unreachable: try again later")
            except HistoryError as exc:
                log.error("agentruns API: %s", exc)  # noqa: TRY400 - the message says it all
                return _status(500, "reading the run history failed")

        return handle

    def _user(self, request: web.Request) -> User:
        """Who the front proxy says asks; a GET only."""
        proxy = self.front_proxy()
        if proxy is None:
            raise _FailureError(503, "the agentruns API is starting (no request-header CA yet)")
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        user = proxy.user(peer, request.headers)
        if user is None:
            raise _FailureError(401, "Unauthorized: requests come through the kube-apiserver")
        if request.method != "GET":
            raise _FailureError(
                405, f"the method {request.method} is not allowed: agentruns are read-only"
            )
        return user

    # ---- discovery -----------------------------------------------------------------------

    async def group_list(self, _request: web.Request, _user: User) -> web.StreamResponse:
        return web.json_response(res.api_group_list())

    async def group(self, _request: web.Request, _user: User) -> web.StreamResponse:
        return web.json_response(res.api_group())

    async def resource_list(self, _request: web.Request, _user: User) -> web.StreamResponse:
        return web.json_response(res.api_resource_list())

    async def openapi_v2(self, _request: web.Request, _user: User) -> web.StreamResponse:
        return web.json_response(
            {"swagger": "2.0", "info": {"title": res.GROUP, "version": res.VERSION}, "paths": {}}
        )

    async def openapi_v3(self, _request: web.Request, _user: User) -> web.StreamResponse:
        return web.json_response({"paths": {}})

    # ---- resources -----------------------------------------------------------------------

    async def _authorize(
        self, user: User, verb: str, namespace: str | None, name: str = ""
    ) -> None:
        allowed, reason = await asyncio.to_thread(self.reviews.allowed, user, verb, namespace, name)
        if not allowed:
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            what = f'agentruns.{res.GROUP} "{name}"' if name else f"agentruns.{res.GROUP}"
            because = f": {reason}" if reason else ""
            raise _FailureError(
                403,
                f'{what} is forbidden: User "{user.name}" cannot {verb} resource "agentruns" '
                f'in API group "{res.GROUP}"{where}{because}',
            )

    def _history(self) -> History:
        if self.history is None:
            raise _FailureError(503, "the operator has no run history database")
        return self.history

    async def one(self, request: web.Request, user: User) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if request.query.get("watch") in ("1", "true"):
            raise _FailureError(
                400, "watch a single AgentRun with fieldSelector=metadata.name=NAME"
            )
        await self._authorize(user, "get", namespace, name)
        history = self._history()
        parsed = res.parse_name(name)
        record = None
        if parsed is not None:
            record = await asyncio.to_thread(history.get, parsed[1], include_output=True)
        if (
            record is None
            or parsed is None
            or (record.namespace, record.schedule_name) != (namespace, parsed[0])
        ):
            raise _FailureError(404, f'agentruns.{res.GROUP} "{name}" not found')
        if _as_table(request):
            return web.json_response(self._table(request, [record], record.revision))
        return web.json_response(res.agent_run(record, with_output=True))

    def _table(
        self,
        request: web.Request,
        records: list[ExecutionRecord],
        version: int,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        """The Table kubectl asked for, the objects in its rows as ``includeObject`` says."""
        return res.table(
            records,
            now=self.clock(),
            include_object=request.query.get("includeObject", "Metadata"),
            resource_version=version,
            continue_token=continue_token,
        )

    async def collection(self, request: web.Request, user: User) -> web.StreamResponse:
        namespace = request.match_info.get("namespace")
        query = request.query
        watching = query.get("watch") in ("1", "true")
        await self._authorize(user, "watch" if watching else "list", namespace)
        selection = select(
            namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
        )
        if watching:
            return await self._watch(request, selection)
        return await self._list(request, selection)

    async def _list(self, request: web.Request, selection: Selection) -> web.StreamResponse:
        history = self._history()
        limit = _limit(request.query.get("limit"))
        token = request.query.get("continue")
        after = decode_continue(token) if token else None
        # The settled version: a watch from it misses no write still in flight at this list.
        version = await asyncio.to_thread(history.latest_revision, SETTLE)
        if selection.empty:
            records: list[ExecutionRecord] = []
            more = False
        else:
            records, more = await asyncio.to_thread(
                history.run_page, selection.filter, limit=limit, after=after
            )
        next_token = encode_continue(records[-1].started_at, records[-1].id) if more else None
        if _as_table(request):
            return web.json_response(self._table(request, records, version, next_token))
        return web.json_response(
            res.run_list(records, resource_version=version, continue_token=next_token)
        )

    async def _watch(self, request: web.Request, selection: Selection) -> web.StreamResponse:
        """Stream watch events (one JSON document per line) of runs written after the given
        ``resourceVersion`` (unset or 0: from the history's settled version on), until
        ``timeoutSeconds``."""
        history = self._history()
        as_table = _as_table(request)
        since = _resource_version(request.query.get("resourceVersion"))
        if since == 0:
            since = await asyncio.to_thread(history.latest_revision, SETTLE)
        timeout = _watch_seconds(request.query.get("timeoutSeconds"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        # Selectors nothing can match: a quiet watch until its timeout (or the client leaves).
        while selection.empty and loop.time() < ends and not _gone(request):
            await asyncio.sleep(min(5.0, max(0.0, ends - loop.time())))
        stream = _WatchStream(since, self.clock())
        while loop.time() < ends and not selection.empty and not _gone(request):
            heard = self.changes.latest
            rows, db_now = await asyncio.to_thread(
                history.changed_since, stream.cursor, selection.filter, limit=_WATCH_PAGE
            )
            for kind, record in stream.events(rows):
                obj = (
                    self._table(request, [record], record.revision)
                    if as_table
                    else res.agent_run(record)
                )
                await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            if stream.advance(rows, db_now, full=len(rows) >= _WATCH_PAGE):
                continue  # a full page: read the next one at once
            # At most 30 s between looks at the connection: a watcher whose client left ends.
            await self.changes.wait(heard, min(30.0, max(0.0, ends - loop.time())))
        await response.write_eof()
        return response


_WATCH_PAGE = 500


class _WatchStream:
    """Where a watch stands: ``settled`` (every change at or below it was seen: no write still
    in flight can land there), ``cursor`` (where the next read starts: ``settled``, or past a
    full page), what was sent within the settle window, and which runs were announced."""

    def __init__(self, since: int, began: datetime) -> None:
        self.settled = self.cursor = since
        self.began = began
        self.sent: dict[int, int] = {}  # run id -> revision sent, within the settle window
        self.announced: set[int] = set()  # run ids sent at all (ADDED at most once each)

    def events(self, rows: list[ExecutionRecord]) -> list[tuple[str, ExecutionRecord]]:
        """The changes not sent yet: ADDED for a run first seen that started after the watch
        began, MODIFIED otherwise (purged runs send no DELETED: history only ages out)."""
        events = []
        for record in rows:
            if self.sent.get(record.id, -1) >= record.revision:
                continue
            fresh = record.id not in self.announced and record.started_at >= self.began - timedelta(
                seconds=5
            )
            self.sent[record.id] = record.revision
            self.announced.add(record.id)
            events.append(("ADDED" if fresh else "MODIFIED", record))
        return events

    def advance(self, rows: list[ExecutionRecord], db_now: datetime, *, full: bool) -> bool:
        """Move on after a read; True when a full page was read (the next one follows at once,
        from past it; the settle window is read again after)."""
        if self.cursor == self.settled:
            self.settled = _settled(self.settled, rows, db_now)
            self.sent = {i: rev for i, rev in self.sent.items() if rev > self.settled}
        if full and rows:
            self.cursor = rows[-1].revision
            return True
        self.cursor = self.settled
        return False


def _as_table(request: web.Request) -> bool:
    """kubectl asks for the Table format (``as=Table`` in Accept)."""
    return _TABLE in request.headers.get("Accept", "")


def _gone(request: web.Request) -> bool:
    """The client has hung up (a watcher stops reading for it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _settled(settled: int, rows: list[ExecutionRecord], db_now: datetime) -> int:
    """The revision up to which every change was seen: the rows (in revision order) written
    longer than SETTLE ago, up to the first that is not (it may still have company)."""
    for record in rows:
        if record.updated_at >= db_now - SETTLE:
            break
        settled = record.revision
    return settled


def _limit(raw: str | None) -> int:
    if raw is None or raw in ("", "0"):
        return DEFAULT_LIMIT
    if not raw.isdigit():
        raise _FailureError(400, f"limit {raw!r}: must be a whole number from 1 to {MAX_LIMIT}")
    return max(1, min(MAX_LIMIT, int(raw)))


def _resource_version(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 19:
        raise _FailureError(400, f"resourceVersion {raw!r}: not a resource version of this API")
    return int(raw)


def _watch_seconds(raw: str | None) -> float:
    if raw is None or raw in ("", "0"):  # 0: the default, as the apiserver takes it
        return _WATCH_DEFAULT_SECONDS
    if not raw.isdigit():
        raise _FailureError(400, f"timeoutSeconds {raw!r}: must be a whole number of seconds")
    return float(min(int(raw), _WATCH_MAX_SECONDS))


async def serve(
    app: web.Application, bind: str, port: int, context: ssl.SSLContext
) -> web.AppRunner:
    """Serve ``app`` over TLS; stop it with ``runner.cleanup()`` (open watches end)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, bind, port, ssl_context=context, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("agentruns API listening on %s:%d (TLS)", bind, port)
    return runner
