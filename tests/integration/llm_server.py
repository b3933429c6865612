"""A scripted local HTTP server for runner tests: it speaks the OpenAI Chat Completions and the
Anthropic Messages wire protocols (and serves plain pages for ``web_fetch`` tests).

Each test scripts what the server answers, in order, per path: a ``Reply`` or a function of the
request. The helpers ``openai_*`` and ``anthropic_*`` build protocol-shaped answers whose usage,
by default, is computed from the request like a real provider's would be — one token per 4 bytes
of the request body (within the runner's input bound of a token per byte) and of the answer,
never more than the request's ``max_tokens``. Every request is recorded for assertions.

The server binds 127.0.0.1 on a free port and runs in a thread; use it as a context manager.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

AUTO: Literal["auto"] = "auto"
UsageSpec = Literal["auto"] | Mapping[str, Any] | None


@dataclass(frozen=True)
class Recorded:
    """One request the server received."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """What the server answers. ``drop`` closes the connection without an answer; ``delay``
    waits before answering; ``body`` (bytes) wins over ``json``."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if self.body is not None:
            return self.body, headers
        headers.setdefault("content-type", "application/json")
        return json.dumps(self.json if self.json is not None else {}).encode(), headers


Script = Reply | Callable[[Recorded], Reply]


class ScriptedServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 answering scripted replies per (method, path)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.unscripted: list[Recorded] = []
        self._queues: dict[tuple[str, str], deque[Script]] = {}
        self._static: dict[tuple[str, str], Script] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def script(self, path: str, *replies: Script, method: str = "POST") -> None:
        """Queue ``replies`` for ``path``: each request takes the next one."""
        with self._lock:
            self._queues.setdefault((method, path), deque()).extend(replies)

    def route(self, path: str, reply: Script, *, method: str = "GET") -> None:
        """Answer every request for ``path`` with ``reply``."""
        with self._lock:
            self._static[(method, path)] = reply

    def requests_to(self, path: str) -> list[Recorded]:
        """Recorded requests for ``path``, in order."""
        return [r for r in self.requests if r.path == path]

    def pending(self, path: str, method: str = "POST") -> int:
        """Scripted replies not yet taken."""
        return len(self._queues.get((method, path), ()))

    def _next(self, request: Recorded) -> Reply:
        key = (request.method, request.path.split("?")[0])
        with self._lock:
            self.requests.append(request)
            queue = self._queues.get(key)
            script = queue.popleft() if queue else self._static.get(key)
            if script is None:
                self.unscripted.append(request)
        if script is None:
            return Reply(status=599, json={"error": {"message": f"unscripted {key}"}})
        return script(request) if callable(script) else script


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up early (size limits, timeouts) are part of the tests."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Recorded(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            reply = server._next(request)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            payload, headers = reply.encoded()
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = _serve  # noqa: N815 - http.server's naming
        do_POST = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests assert on recorded requests instead."""

    return Handler


# --- protocol helpers -------------------------------------------------------------------------

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"


def _tokens(data: bytes) -> int:
    return math.ceil(len(data) / 4)


def _max_tokens(request: Recorded) -> int:
    body = request.json()
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    return int(value) if value is not None else 1_000_000


def _usage(
    usage: UsageSpec, request: Recorded, answer: bytes, keys: tuple[str, str]
) -> Mapping[str, Any] | None:
    if not isinstance(usage, str):
        return usage
    return {
        keys[0]: _tokens(request.body),
        keys[1]: min(_max_tokens(request), max(1, _tokens(answer))),
    }


@dataclass(frozen=True)
class Call:
    """A tool call a scripted model makes."""

    name: str
    arguments: Mapping[str, Any] | str  # a string is sent verbatim (e.g. invalid JSON)
    id: str = ""


def openai_reply(
    text: str | None = None,
    calls: Sequence[Call] = (),
    *,
    usage: UsageSpec = AUTO,
    finish_reason: str | None = None,
) -> Callable[[Recorded], Reply]:
    """A Chat Completions answer with ``text`` and/or tool ``calls``."""

    def answer(request: Recorded) -> Reply:
        tool_calls = [
            {
                "id": call.id or f"call_{i}",
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": call.arguments
                    if isinstance(call.arguments, str)
                    else json.dumps(call.arguments),
                },
            }
            for i, call in enumerate(calls)
        ]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        answer_bytes = json.dumps(message).encode()
        body: dict[str, Any] = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": request.json().get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_reason or ("tool_calls" if calls else "stop"),
                }
            ],
        }
        reported = _usage(usage, request, answer_bytes, ("prompt_tokens", "completion_tokens"))
        if reported is not None:
            body["usage"] = dict(reported)
        return Reply(json=body)

    return answer


def anthropic_reply(
    text: str | None = None,
    calls: Sequence[Call] = (),
    *,
    usage: UsageSpec = AUTO,
    stop_reason: str | None = None,
) -> Callable[[Recorded], Reply]:
    """A Messages answer with a text block and/or ``tool_use`` blocks."""

    def answer(request: Recorded) -> Reply:
        content: list[dict[str, Any]] = []
        if text:
            content.append({"type": "text", "text": text})
        content.extend(
            {
                "type": "tool_use",
                "id": call.id or f"toolu_{i}",
                "name": call.name,
                "input": call.arguments,
            }
            for i, call in enumerate(calls)
        )
        body: dict[str, Any] = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": request.json().get("model"),
            "content": content,
            "stop_reason": stop_reason or ("tool_use" if calls else "end_turn"),
        }
        reported = _usage(
            usage, request, json.dumps(content).encode(), ("input_tokens", "output_tokens")
        )
        if reported is not None:
            body["usage"] = dict(reported)
        return Reply(json=body)

    return answer


def error_reply(status: int, message: str = "", **headers: str) -> Reply:
    """An error in the providers' shared shape (``{"error": {"message": ...}}``)."""
    return Reply(
        status=status,
        json={"error": {"message": message or f"status {status}", "type": "test_error"}},
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def html_page(body: str, *, title: str = "Test page", status: int = 200) -> Reply:
    """An HTML page."""
    html = f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"
    return Reply(
        status=status, body=html.encode(), headers={"content-type": "text/html; charset=utf-8"}
    )


def redirect(location: str, status: int = 302) -> Reply:
    """A redirect to ``location``."""
    return Reply(status=status, body=b"", headers={"location": location})


def free_port() -> int:
    """A loopback port nothing listens on (for connection-refused tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running() -> Iterator[ScriptedServer]:
    """Generator for a pytest fixture: a started server, stopped afterwards."""
    with ScriptedServer() as server:
        yield server
