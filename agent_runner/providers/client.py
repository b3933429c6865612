"""A JSON-over-HTTPS POST with the runner's retry, timeout and error rules, shared by the
OpenAI-compatible and Anthropic providers.

- 429, 408, 409, 529 (overloaded), 503 with ``Retry-After``, and connection failures before the
  request was sent, are refusals before processing: retried here with backoff honouring
  ``Retry-After``, never past the deadline.
- A request that was sent but got no response (read timeout, dropped connection), or an answer
  that may follow a completed generation (500, 502, 504, 503 without ``Retry-After``), may have
  been billed: ``OutcomeUnknownError``, not retried here — the agent charges its reservation,
  then reserves again for the retry, so the ledger never undercounts.
- 401/403/404 are configuration errors (key, access, model or baseURL); other 4xx are
  ``ProviderRejectedError``.
- The API key never appears in an error message or a log line: provider error texts are
  redacted before use.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from agent_runner.config import ConfigError
from agent_runner.providers.base import (
    DeadlineReachedError,
    OutcomeUnknownError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    Usage,
    valid_json,
)
from agent_runner.providers.retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    may_have_been_processed,
    parse_retry_after,
    retry_delay,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
_ERROR_TEXT_LIMIT = 300
_KEY_LIKE = re.compile(r"\b(sk|key|pk)-[A-Za-z0-9_\-*.]{6,}")

# The server cannot have processed the request (no connection, or the body was not fully
# written): safe to retry, never billed.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.WriteError,
    httpx.WriteTimeout,
)
# The whole request was sent but no response arrived: it may have been processed and billed.
_MAYBE_SENT = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` (or any long piece of it) or anything shaped like an API key."""
    if secret:
        text = text.replace(secret, "[redacted]")
        for size in (16, 8):
            for start in range(0, max(len(secret) - size + 1, 0)):
                piece = secret[start : start + size]
                if piece in text:
                    text = text.replace(piece, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)


def error_detail(body: bytes, secret: str | None) -> tuple[str, Mapping[str, Any]]:
    """The provider's error message (redacted, shortened) and its error object, from an OpenAI
    (``{"error": {...}}``) or Anthropic (``{"type": "error", "error": {...}}``) error body."""
    error: Mapping[str, Any] = {}
    try:
        parsed = json.loads(body)
    except ValueError:
        message = body.decode("utf-8", "replace")
    else:
        inner = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(inner, dict):
            error = inner
            message = str(inner.get("message", ""))
        elif isinstance(inner, str):
            message = inner
        else:
            message = json.dumps(parsed)[:_ERROR_TEXT_LIMIT]
    message = " ".join(redact(message, secret).split())
    if len(message) > _ERROR_TEXT_LIMIT:
        message = message[: _ERROR_TEXT_LIMIT - 3] + "..."
    return message, error


def encode(payload: Mapping[str, Any]) -> bytes:
    """A request body exactly as sent (and as measured for the input bound)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_from(raw: object, input_key: str, output_key: str, *extra_input: str) -> Usage | None:
    """Usage from a provider's usage object (``extra_input`` counts, when present, add to the
    input); None unless every present count is a non-negative integer."""
    if not isinstance(raw, dict):
        return None
    input_tokens = _count(raw.get(input_key))
    output_tokens = _count(raw.get(output_key))
    if input_tokens is None or output_tokens is None:
        return None
    for key in extra_input:
        if raw.get(key) is None:
            continue
        extra = _count(raw.get(key))
        if extra is None:
            return None
        input_tokens += extra
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)


class JsonClient:
    """POSTs JSON to one endpoint of one provider."""

    def __init__(
        self,
        *,
        provider: str,
        url: str,
        headers: Mapping[str, str],
        secret: str | None,
        retry: RetryPolicy,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.provider = provider
        self.url = url
        self._secret = secret
        self._retry = retry
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._http = httpx.Client(
            headers=dict(headers), transport=transport, trust_env=False, follow_redirects=False
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def post(self, body: bytes, *, deadline: float) -> dict[str, Any]:
        """POST ``body`` (JSON) and return the decoded JSON object of a 2xx answer."""
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineReachedError(f"{self.provider}: the run's deadline passed")
            timeout = httpx.Timeout(
                remaining,
                connect=min(CONNECT_TIMEOUT, remaining),
                pool=min(CONNECT_TIMEOUT, remaining),
            )
            try:
                response = self._http.post(
                    self.url,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=timeout,
                )
            except _NOT_SENT as exc:
                reason = f"connection failed ({type(exc).__name__})"
                retry_after = None
            except _MAYBE_SENT as exc:
                raise OutcomeUnknownError(
                    f"{self.provider} {self.url}: no response ({type(exc).__name__}); the "
                    "request may have been processed"
                ) from exc
            except httpx.UnsupportedProtocol as exc:
                raise ConfigError(f"agent.baseURL {self.url!r}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise ProviderError(
                    f"{self.provider} {self.url}: {type(exc).__name__}: "
                    f"{redact(str(exc), self._secret)}"
                ) from exc
            else:
                if response.is_success:
                    return self._decode(response)
                if response.status_code not in RETRYABLE_STATUSES:
                    self._raise_for(response)
                message, _ = error_detail(response.content, self._secret)
                reason = f"HTTP {response.status_code} {message}".rstrip()
                retry_after = parse_retry_after(response.headers)
                if may_have_been_processed(response.status_code, retry_after):
                    raise OutcomeUnknownError(
                        f"{self.provider} {self.url}: {reason}; the request may have been "
                        "processed",
                        retry_after=retry_after,
                    )
            if attempt >= self._retry.max_attempts:
                raise ProviderUnavailableError(
                    f"{self.provider} {self.url}: {reason}; gave up after {attempt} attempts"
                )
            delay = retry_delay(attempt, self._retry, self._rng, retry_after)
            if delay is None or self._clock() + delay >= deadline:
                raise ProviderUnavailableError(
                    f"{self.provider} {self.url}: {reason}; "
                    + (
                        f"Retry-After {retry_after:.0f}s is too long"
                        if delay is None
                        else f"a retry in {delay:.1f}s would pass the run's deadline"
                    )
                )
            log.warning(
                "%s: %s; retry %d/%d in %.2fs",
                self.provider,
                reason,
                attempt,
                self._retry.max_attempts - 1,
                delay,
            )
            self._sleep(delay)

    def _decode(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = valid_json(response.json())
        except ValueError as exc:
            raise ProviderError(
                f"{self.provider} {self.url}: HTTP {response.status_code} with a body that is "
                "not JSON",
                maybe_billed=True,
            ) from exc
        if not isinstance(data, dict):
            raise ProviderError(
                f"{self.provider} {self.url}: HTTP {response.status_code} with a JSON "
                f"{type(data).__name__}, expected an object",
                maybe_billed=True,
            )
        return data

    def _raise_for(self, response: httpx.Response) -> None:
        status = response.status_code
        message, error = error_detail(response.content, self._secret)
        if status in (401, 403):
            raise ConfigError(
                f"NOCTURNE_LLM_API_KEY: {self.provider} {self.url} answered HTTP {status} "
                f"(key rejected or not allowed): {message}"
            )
        if status == 404:
            raise ConfigError(
                f"agent.model/agent.baseURL: {self.provider} {self.url} answered HTTP 404 "
                f"(unknown model or wrong endpoint): {message}"
            )
        raise ProviderRejectedError(
            f"{self.provider} {self.url}: HTTP {status}: {message}", status=status, error=error
        )
