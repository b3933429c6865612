"""The runner's client of the operator's run API (``agent_runner.contract``): start -> budget
grant, progress, checkpoint, finish.

TLS is verified against the operator's own CA only (``NOCTURNE_RUN_API_CA``; the system trust
store is not consulted) with the hostname checked; proxies and ``SSL_CERT_*`` variables in the
environment are ignored. The bearer token is re-read from its file on every request: the kubelet
rotates projected tokens. The token never appears in a log line or an error message.

Errors say what to do with the run:

- ``NoGrantError`` (409 on start): no budget for this attempt; spend nothing.
- ``RunApiRefusedError`` (other 4xx, a certificate that does not verify, an unreadable token
  file): the request or the pod's configuration is wrong; retrying cannot help.
- ``RunApiUnavailableError`` (connection errors, timeouts, 429, 5xx, an answer that is not the
  contract's document): retried within the call's deadline (about 7 s of pauses at most without
  one), then raised.

The URL is the operator's Service, and the operator runs as two replicas (issue 15): a try that
fails on one (it was killed, or it closed a kept-alive connection while stopping) is retried on
a new connection, which the Service sends to a replica that serves. Every report is idempotent
on the server (a start replayed by the same pod gets its recorded grant, progress and
checkpoints carry totals, a finish is recorded once), so a try whose answer was lost is safe to
repeat.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from agent_runner.contract import (
    CHECKPOINT_PATH,
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    Ack,
    ApiError,
    CheckpointReport,
    FinishReport,
    Grant,
    ProgressReport,
    StartRequest,
    describe_validation_error,
)
from agent_runner.exitcodes import BUDGET_EXHAUSTED, CONFIG_ERROR, TRANSIENT, RunnerError

__all__ = [
    "MAX_RESPONSE_BYTES",
    "NoGrantError",
    "RunApiClient",
    "RunApiError",
    "RunApiRefusedError",
    "RunApiUnavailableError",
]

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""The largest answer read (a grant carries at most 64 KiB of state, 256 KiB of output and a
2 MiB checkpoint)."""
_MAX_TOKEN_BYTES = 64 * 1024
_PREVIEW_CHARS = 200
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
M = TypeVar("M", bound=BaseModel)


class RunApiError(RunnerError):
    """A run API request did not succeed."""

    exit_code = TRANSIENT


class NoGrantError(RunApiError):
    """The operator refused a budget grant (409): this attempt must spend nothing."""

    exit_code = BUDGET_EXHAUSTED

    def __init__(self, reason: str, message: str, *, endpoint: str = "run API") -> None:
        super().__init__(f"{endpoint}: HTTP 409: {reason}: {message}")
        self.reason = reason
        self.message = message


class RunApiRefusedError(RunApiError):
    """The run API refused the request (400, 403, 422, ...) or could not be trusted (TLS);
    a retry with the same pod and configuration cannot succeed."""

    exit_code = CONFIG_ERROR


class RunApiUnavailableError(RunApiError):
    """The run API did not answer usefully within the retries (down, overloaded, its database
    unreachable, or an answer that is not the contract's)."""


class _Retry(Exception):  # noqa: N818 - an internal signal, not an error users see
    """One try failed in a way another try may not."""


class RunApiClient:
    """Blocking client of the run API; one per run. Not thread-safe."""

    def __init__(
        self,
        url: str,
        ca_pem: str,
        token_file: Path,
        *,
        timeout: float = 5.0,
        attempts: int = 6,
        backoff: float = 0.25,
        max_backoff: float = 2.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        """``url``: ``https://host:port``; ``ca_pem``: the CA bundle the server's certificate must
        chain to. ``timeout`` bounds each try; ``attempts`` tries are made with backoff
        ``backoff``, 3x``backoff``, ... (at most ``max_backoff``) in between: long enough for
        the Service to stop sending to a replica that died. RunApiRefusedError if the CA is
        unusable."""
        if not url.startswith("https://"):
            raise RunApiRefusedError(f"run API URL {url!r}: must be https://")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        try:
            context = ssl.create_default_context(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise RunApiRefusedError(
                f"NOCTURNE_RUN_API_CA: not a usable PEM certificate bundle: {exc}"
            ) from None
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_response_bytes = max_response_bytes
        self._timeout = timeout
        self._client = httpx.Client(
            base_url=self.url,
            verify=context,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            follow_redirects=False,
            # In-cluster service: no proxy, and no CA from the environment.
            trust_env=False,
            headers={"accept": "application/json", "content-type": "application/json"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> RunApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, request: StartRequest, *, deadline: float | None = None) -> Grant:
        """Ask for this attempt's budget grant. NoGrantError on 409 (spend nothing)."""
        return self._post(START_PATH, request, Grant, deadline=deadline, no_grant=True)

    def progress(self, report: ProgressReport, *, deadline: float | None = None) -> None:
        """Report the cost so far."""
        self._post(PROGRESS_PATH, report, Ack, deadline=deadline)

    def checkpoint(self, report: CheckpointReport, *, deadline: float | None = None) -> None:
        """Keep the Job's transcript after a completed step (a retry resumes from it)."""
        self._post(CHECKPOINT_PATH, report, Ack, deadline=deadline)

    def finish(self, report: FinishReport, *, deadline: float | None = None) -> None:
        """Report the attempt's final record (idempotent on the server)."""
        self._post(FINISH_PATH, report, Ack, deadline=deadline)

    def _post(
        self,
        path: str,
        document: BaseModel,
        answer: type[M],
        *,
        deadline: float | None,
        no_grant: bool = False,
    ) -> M:
        """POST ``document`` and return the validated ``answer``, retrying what may pass on a
        next try until ``attempts`` or ``deadline`` (seconds from now, for all tries) run out."""
        body = document.model_dump_json().encode("utf-8")
        endpoint = f"run API POST {path}"
        ends = None if deadline is None else time.monotonic() + deadline
        delay = self.backoff
        problem = f"no time left within the call's deadline of {deadline} s"
        for attempt in range(1, self.attempts + 1):
            timeout = self._timeout
            if ends is not None:
                timeout = min(timeout, ends - time.monotonic())
                if timeout <= 0:
                    break
            try:
                return self._try(endpoint, path, body, answer, timeout, no_grant=no_grant)
            except _Retry as exc:
                problem = str(exc)
            last = attempt == self.attempts
            if last or (ends is not None and time.monotonic() + delay >= ends):
                raise RunApiUnavailableError(
                    f"{endpoint}: {problem} (after {attempt} tries)"
                ) from None
            log.warning("%s: %s; retrying in %.2f s", endpoint, problem, delay)
            time.sleep(delay)
            delay = min(delay * 3, self.max_backoff)
        raise RunApiUnavailableError(f"{endpoint}: {problem}")

    def _try(
        self,
        endpoint: str,
        path: str,
        body: bytes,
        answer: type[M],
        timeout: float,
        *,
        no_grant: bool,
    ) -> M:
        headers = {"authorization": f"Bearer {self._token()}"}
        try:
            with self._client.stream(
                "POST", path, content=body, headers=headers, timeout=timeout
            ) as response:
                status = response.status_code
                data = self._read(response)
        except httpx.TransportError as exc:
            if _certificate_refused(exc):
                raise RunApiRefusedError(
                    f"{endpoint}: TLS: the server's certificate does not verify against "
                    f"NOCTURNE_RUN_API_CA for {self.url}: {_innermost(exc)}"
                ) from None
            raise _Retry(f"{type(exc).__name__}: {_innermost(exc)}") from None
        if status == 200:
            try:
                return answer.model_validate_json(data)
            except ValidationError as exc:
                # A proxy's page or an operator of another version: not our contract.
                raise _Retry(
                    f"HTTP 200 with a body that is not a {answer.__name__}: "
                    f"{describe_validation_error(exc, prefix=answer.__name__ + '.')[:500]}"
                ) from None
        problem = f"HTTP {status}{_error_text(data)}"
        if status in _RETRY_STATUSES or status >= 500:
            raise _Retry(problem)
        if status == 409 and no_grant:
            error = _api_error(data)
            if error is None:
                raise NoGrantError("NoGrant", problem, endpoint=endpoint)
            raise NoGrantError(error.reason, error.message, endpoint=endpoint)
        raise RunApiRefusedError(f"{endpoint}: {problem}")

    def _read(self, response: httpx.Response) -> bytes:
        """The body, at most ``max_response_bytes`` (a longer one is an error)."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            raise _Retry(
                f"HTTP {response.status_code} with a {declared}-byte answer "
                f"(limit {self.max_response_bytes})"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise _Retry(
                    f"HTTP {response.status_code} with an answer over "
                    f"{self.max_response_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _token(self) -> str:
        """The projected token as it is now (never logged)."""
        try:
            with self.token_file.open("rb") as handle:
                raw = handle.read(_MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise RunApiRefusedError(
                f"run API token file {str(self.token_file)!r}: cannot read: {exc.strerror}"
            ) from None
        token = raw.decode("ascii", "replace").strip()
        if not token or len(raw) > _MAX_TOKEN_BYTES or any(ch.isspace() for ch in token):
            raise RunApiRefusedError(
                f"run API token file {str(self.token_file)!r}: not a token "
                f"(empty, over {_MAX_TOKEN_BYTES} bytes or with spaces)"
            )
        return token


def _api_error(data: bytes) -> ApiError | None:
    try:
        return ApiError.model_validate_json(data)
    except ValidationError:
        return None


def _error_text(data: bytes) -> str:
    """``: Reason: message`` from an ApiError body, or a short preview of another body."""
    error = _api_error(data)
    if error is not None:
        return f": {error.reason}: {error.message}"
    text = data[: _PREVIEW_CHARS * 4].decode("utf-8", "replace").strip()
    text = " ".join(text.split())[:_PREVIEW_CHARS]
    return f" (not an ApiError: {text!r})" if text else " (empty body)"


def _certificate_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _innermost(exc: BaseException) -> str:
    """The root cause's message (httpx wraps the socket's and ssl's errors)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc) or type(exc).__name__
