"""A local stand-in of the operator's run API for runner tests: the runner's side of the contract
(``agent_runner.contract``) over real TLS, with a throwaway CA of the operator's own kind
(``nocturne_operator.runapi.tls.RunApiTls``: the same certificates the real run API serves).

It validates every request against the contract's models (422 ``ApiError`` otherwise), answers
scripted replies per path in order (defaults: a grant for start, an ``Ack`` for progress and
finish) and records what it received. The operator's real server is tested by its own tests.

The server binds 127.0.0.1 on a free port, runs aiohttp in a thread; use it as a context manager.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent_runner.contract import (
    CHECKPOINT_PATH,
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    CheckpointReport,
    FinishReport,
    ProgressReport,
    StartRequest,
)
from nocturne_operator.runapi.tls import RunApiTls

DOCUMENTS: dict[str, type[BaseModel]] = {
    START_PATH: StartRequest,
    PROGRESS_PATH: ProgressReport,
    FINISH_PATH: FinishReport,
    CHECKPOINT_PATH: CheckpointReport,
}


def price_json(provider: str = "openai", model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A ``ModelPrice`` on the wire (gpt-4o-mini's list price)."""
    return {
        "provider": provider,
        "model": model,
        "inputUSDPerMTok": "0.15",
        "outputUSDPerMTok": "0.60",
        "maxOutputTokens": 16384,
    }


def grant_json(
    *,
    execution_id: int = 7,
    attempt: int = 0,
    limit: str = "0.50",
    price: Mapping[str, Any] | None = None,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``Grant`` on the wire."""
    grant: dict[str, Any] = {
        "executionId": execution_id,
        "attempt": attempt,
        "limitUSD": limit,
        "price": dict(price or price_json()),
    }
    if previous is not None:
        grant["previous"] = dict(previous)
    return grant


def api_error(reason: str, message: str) -> dict[str, str]:
    """An ``ApiError`` on the wire."""
    return {"reason": reason, "message": message}


@dataclass(frozen=True)
class Received:
    """One request the server received (headers with lower-case names)."""

    path: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Answer:
    """What the server answers: ``body`` (bytes) wins over ``json``; ``delay`` waits first."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)


Script = Answer | Callable[[Received], Answer]


def _default(path: str) -> Answer:
    if path == START_PATH:
        return Answer(json=grant_json())
    return Answer(json={"recorded": True})


class RunApiServer:
    """The run API stand-in on ``https://127.0.0.1:<port>``, its certificate from ``ca`` for
    ``hosts``."""

    def __init__(
        self,
        ca: RunApiTls | None = None,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        # The given CA with a serving certificate for ``hosts`` (a fresh CA when none is given).
        self.ca = (ca or RunApiTls.create(list(hosts))).with_new_server_cert(list(hosts))
        self.hosts = hosts
        self.requests: list[Received] = []
        self._scripts: dict[str, deque[Script]] = {}
        self._static: dict[str, Script] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>``."""
        return f"https://127.0.0.1:{self.port}"

    def script(self, path: str, *answers: Script) -> None:
        """Queue ``answers`` for ``path``: each request takes the next; then the default."""
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(answers)

    def route(self, path: str, answer: Script) -> None:
        """Answer every request for ``path`` (once its script is used up) with ``answer``."""
        with self._lock:
            self._static[path] = answer

    def requests_to(self, path: str) -> list[Received]:
        """Recorded requests for ``path``, in order."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def __enter__(self) -> RunApiServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        context = self.ca.server_context()
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
        )
        answer = self._check(request, received)
        with self._lock:
            self.requests.append(received)
            script = None
            if answer is None:
                queue = self._scripts.get(received.path)
                script = queue.popleft() if queue else self._static.get(received.path)
        if answer is None:
            if script is None:
                answer = _default(received.path)
            else:
                answer = script(received) if callable(script) else script
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.body is not None:
            return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        return web.json_response(
            answer.json if answer.json is not None else {},
            status=answer.status,
            headers=answer.headers,
        )

    @staticmethod
    def _check(request: web.Request, received: Received) -> Answer | None:
        """The contract's checks a real server makes first: method, path, token, document."""
        model = DOCUMENTS.get(received.path)
        if request.method != "POST" or model is None:
            return Answer(404, api_error("NotFound", f"{request.method} {received.path}"))
        auth = received.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            return Answer(401, api_error("Unauthorized", "a bearer token is required"))
        try:
            model.model_validate_json(received.body)
        except ValidationError as exc:
            return Answer(422, api_error("InvalidReport", str(exc)[:4000]))
        return None
