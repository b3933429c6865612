"""A local stand-in of the operator's run API for runner tests: the runner's side of the contract
(``agent_runner.contract``) over real TLS, with a throwaway CA made by ``cryptography``.

It validates every request against the contract's models (422 ``ApiError`` otherwise), answers
scripted replies per path in order (defaults: a grant for start, an ``Ack`` for progress and
finish) and records what it received. The operator's real server is tested by its own tests.

The server binds 127.0.0.1 on a free port, runs aiohttp in a thread; use it as a context manager.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ValidationError

from agent_runner.contract import (
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    FinishReport,
    ProgressReport,
    StartRequest,
)

DOCUMENTS: dict[str, type[BaseModel]] = {
    START_PATH: StartRequest,
    PROGRESS_PATH: ProgressReport,
    FINISH_PATH: FinishReport,
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


class CertificateAuthority:
    """A throwaway CA (EC P-256) that issues server certificates for 127.0.0.1 and localhost."""

    def __init__(self, name: str = "nocturne-test-ca") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        """The CA certificate (what ``NOCTURNE_RUN_API_CA`` carries)."""
        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[bytes, bytes]:
        """A server certificate and its key (PEM) for ``hosts`` (IP addresses or DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


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
        ca: CertificateAuthority | None = None,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        self.ca = ca or CertificateAuthority()
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
        cert, key = self.ca.issue(self.hosts)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="runapi-tls-") as tmp:
            (Path(tmp) / "tls.crt").write_bytes(cert)
            (Path(tmp) / "tls.key").write_bytes(key)
            context.load_cert_chain(Path(tmp) / "tls.crt", Path(tmp) / "tls.key")
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
