"""Webhook notifications of AgentSchedules: which notices a finished run or a schedule event
produces (subscription, dedupe, cooldown, recovery) and the async loop that POSTs them. The
values live in notices.py, the outbox they wait in (PostgreSQL, or process memory for an
operator without a database) in outbox.py, the bodies in bodies.py.

Enqueueing is synchronous and fast (called from kopf handler threads; never HTTP). Delivery is
at least once: a row is claimed with a lease, so a crash mid-POST sends it again once the lease
ends; receivers dedupe on the ``X-Nocturne-Delivery`` header. The webhook URL is a credential
(Slack's are): it is read from its Secret at delivery time and never stored, logged or put into
an error message.

The webhook URL is the tenant's choice, the connection is the operator's: the Secret is read only
when the cluster settings list its name (``webhook_secrets``); the host is resolved once, every
address goes through the same SSRF guard as the runner's ``web_fetch`` (agent_runner.addresses)
and the POST goes to a checked address (Host and TLS SNI keep the name), so DNS rebinding cannot
move it; redirects are not followed and no proxy from the environment is used. https only, but
with ``webhook_allow_private`` also http to loopback and private receivers; metadata and
link-local addresses never. Nothing of an answer but its status code reaches an outcome, a row,
an Event or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import random
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import httpx

from agent_runner.addresses import (
    UNLOCKED_BY_ALLOW_PRIVATE,
    BlockedAddressError,
    Destination,
    ResolveError,
    Resolver,
    check_address,
    classify,
    default_port,
    resolve,
    system_resolver,
)
from agent_runner.contract import RunOutcome
from nocturne_operator.adapters import metrics
from nocturne_operator.notifications.bodies import render_body
from nocturne_operator.notifications.notices import (
    FAILURE_KINDS,
    Delivery,
    Kind,
    Notice,
    NoticeSubject,
    RunInfo,
    Status,
    Target,
    aware,
    first_line,
    make_notice,
    run_line,
    run_payload,
    utcnow,
)
from nocturne_operator.notifications.outbox import ScheduleView, Store
from nocturne_operator.settings import load_settings
from nocturne_operator.storage import HistoryError

__all__ = ["Notifier", "retry_delay"]

log = logging.getLogger(__name__)

Result = Literal["sent", "failed", "suppressed", "retried"]
USER_AGENT = "nocturne-operator"
ALLOW_PRIVATE_SETTING = "NOCTURNE_WEBHOOK_ALLOW_PRIVATE"
MAX_ADDRESSES_TRIED = 3
_EVENT_KINDS = frozenset({Kind.AUTO_PAUSED, Kind.BUDGET_EXCEEDED, Kind.SILENT_STOP})
# Never held back: a Succeeded notice carries content (the digest) and is opted into per run;
# an auto-pause or a reached budget cannot flap (each needs a human or a new month to end).
_NO_COOLDOWN = frozenset({Kind.SUCCEEDED, Kind.AUTO_PAUSED, Kind.BUDGET_EXCEEDED})
_FAILED_RESULTS = {
    RunOutcome.FAILED: "failed",
    RunOutcome.BUDGET_EXCEEDED: "hit its budget",
    RunOutcome.TIMED_OUT: "timed out",
}


def retry_delay(
    attempts: int,
    *,
    base: timedelta,
    cap: timedelta,
    retry_after: float | None = None,
    jitter: float = 0.0,
) -> timedelta:
    """Wait before the next try after ``attempts`` tries: ``base * 2**(attempts-1)`` capped at
    ``cap``, shortened by up to ``jitter`` (a fraction, 0..1), never shorter than a server's
    ``Retry-After`` seconds (themselves capped at ``cap``)."""
    delay = base
    for _ in range(max(attempts - 1, 0)):
        if delay >= cap:
            break
        delay *= 2
    delay = min(delay, cap)
    if jitter:
        delay *= 1 - random.uniform(0, min(max(jitter, 0.0), 1.0))  # noqa: S311 - not crypto
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(timedelta(seconds=retry_after), cap))
    return delay


# --------------------------------------------------------------------------------------------
# The webhook URL stays secret


class _HideWebhookPaths(logging.Filter):
    """httpx logs each request's URL at INFO; webhook URLs are credentials (the path is the
    token), so only scheme and host reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                f"{a.scheme}://{a.host}/***" if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


_URL_FILTER = _HideWebhookPaths()


def _hide_urls_in_httpx_logs() -> None:
    logger = logging.getLogger("httpx")
    if _URL_FILTER not in logger.filters:
        logger.addFilter(_URL_FILTER)


def _webhook_url(raw: str) -> httpx.URL | None:
    """The URL if ``raw`` (a Secret's value, maybe with a trailing newline) is http(s)."""
    try:
        url = httpx.URL(raw.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return url


# --------------------------------------------------------------------------------------------
# The notifier


@dataclass(frozen=True)
class _Try:
    """The outcome of one delivery try."""

    result: Result
    detail: str
    retry_after: float | None = None


class Notifier:
    """Decides and stores notices (sync, from handler threads) and delivers them (async loop).

    ``resolve_url(namespace, secret_name, key)`` returns the webhook URL and raises LookupError
    with a clear message when the Secret or key is missing; it runs in a worker thread and is
    called only for Secrets named in ``webhook_secrets``. ``webhook_secrets`` and
    ``allow_private`` default to the cluster settings (``load_settings()``); ``resolver`` looks
    up a host's addresses (tests script it).
    ``on_outcome(delivery, result, detail)`` hears every "sent", "failed", "suppressed" and
    "retried" result (``detail`` never holds the URL); it runs in a handler or worker thread,
    never on the event loop, and its exceptions are logged and ignored.
    """

    def __init__(
        self,
        store: Store,
        resolve_url: Callable[[str, str, str], str],
        on_outcome: Callable[[Delivery, str, str], None],
        *,
        max_attempts: int = 6,
        retry_base: timedelta = timedelta(seconds=10),
        retry_cap: timedelta = timedelta(minutes=10),
        timeout: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
        jitter: float = 0.1,
        batch: int = 50,
        concurrency: int = 8,
        retention: timedelta = timedelta(days=30),
        webhook_secrets: Collection[str] | None = None,
        allow_private: bool | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: {max_attempts} must be at least 1")
        if retry_base <= timedelta(0) or retry_cap < retry_base:
            raise ValueError(
                f"retry_base {retry_base} must be positive and at most retry_cap {retry_cap}"
            )
        if timeout <= 0 or batch < 1 or concurrency < 1:
            raise ValueError("timeout, batch and concurrency must be positive")
        self.store = store
        self._resolve_url = resolve_url
        self._on_outcome = on_outcome
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.timeout = timeout
        self._clock = clock
        self._jitter = jitter
        self._batch = batch
        self._concurrency = concurrency
        self.retention = retention
        if webhook_secrets is None or allow_private is None:
            settings = load_settings()
            if webhook_secrets is None:
                webhook_secrets = settings.webhook_secrets
            if allow_private is None:
                allow_private = settings.webhook_allow_private
        self.webhook_secrets = frozenset(webhook_secrets)
        self.allow_private = allow_private
        self._resolver = resolver
        self._tls: ssl.SSLContext | None = None
        self._purged_at: datetime | None = None
        # A claimed row is someone's for this long; then a crashed delivery is tried again.
        self.lease = timedelta(seconds=2 * timeout + 60)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        _hide_urls_in_httpx_logs()

    # ---- enqueue (sync, no HTTP) -------------------------------------------------------------

    def run_finished(
        self, subject: NoticeSubject, target: Target, run: RunInfo, *, now: datetime
    ) -> list[Kind]:
        """Store the notices one finished run produces; returns the kinds queued for delivery.

        Succeeded -> Succeeded (+ Recovered after a failure notice, + Alert all-clear after a
        firing alert); Failed/BudgetExceeded/TimedOut -> Failed; a flagged run -> Alert;
        Cancelled -> nothing. Idempotent per Job UID.
        """
        aware("now", now)
        if run.result is RunOutcome.CANCELLED:
            return []
        details = run_payload(run)

        def notice(kind: Kind, key: str, message: str, *, resolved: bool = False) -> Notice:
            return make_notice(
                subject, target, kind, key, message, run=details, now=now, resolved=resolved
            )

        def plan(view: ScheduleView) -> list[Delivery]:
            stored: list[Delivery | None] = []
            if run.result is RunOutcome.SUCCEEDED:
                message = f"Run {run.job} succeeded{run_line(run)}."
                stored.append(self._put(view, target, notice(Kind.SUCCEEDED, run.job_uid, message)))
                # Only notices from before this run ended count: a run replayed after an
                # operator restart must not "recover" from a failure that came after it.
                ended = run.completed_at or run.started_at
                failure = view.latest(
                    FAILURE_KINDS | {Kind.RECOVERED}, include_suppressed=False, before=ended
                )
                if failure is not None and failure[0] in FAILURE_KINDS:
                    message = (
                        f"Run {run.job} succeeded{run_line(run)}; the schedule has recovered "
                        f"from {failure[0].value}."
                    )
                    resolved = notice(
                        Kind.RECOVERED, f"{run.job_uid}:resolved", message, resolved=True
                    )
                    stored.append(self._put(view, target, resolved))
                alert = view.latest(frozenset({Kind.ALERT}), include_suppressed=True, before=ended)
                if not run.alert and alert is not None and not alert[1]:
                    message = f"Run {run.job} raised no alert; the earlier alert is cleared."
                    cleared = notice(Kind.ALERT, f"{run.job_uid}:resolved", message, resolved=True)
                    stored.append(self._put(view, target, cleared))
            else:
                phrase = _FAILED_RESULTS[run.result]
                message = f"Run {run.job} {phrase} ({run.result.display}){run_line(run)}."
                if run.error:
                    message += f" Error: {first_line(run.error)}"
                stored.append(self._put(view, target, notice(Kind.FAILED, run.job_uid, message)))
            if run.alert:
                reason = first_line(run.alert_reason) or "no reason given"
                message = f"Run {run.job} raised an alert: {reason}"
                stored.append(self._put(view, target, notice(Kind.ALERT, run.job_uid, message)))
            return [d for d in stored if d is not None]

        stored = self._enqueue(subject, plan)
        return [d.kind for d in stored if d.status is Status.PENDING]

    def schedule_event(
        self,
        subject: NoticeSubject,
        target: Target,
        kind: Kind,
        *,
        key: str,
        message: str,
        now: datetime,
    ) -> bool:
        """Store an AutoPaused, BudgetExceeded or SilentStop notice, deduped by ``key`` (e.g.
        the pausedAt stamp); True when it was queued for delivery (not unsubscribed, a
        repeat, or held back by the cooldown)."""
        aware("now", now)
        if kind not in _EVENT_KINDS:
            raise ValueError(
                f"kind {kind!r}: schedule events are {sorted(k.value for k in _EVENT_KINDS)}; "
                "run notices come from run_finished()"
            )
        if not key:
            raise ValueError("key must not be empty (it is the dedupe key)")
        notice = make_notice(subject, target, kind, key, message, run=None, now=now, resolved=False)
        stored = self._enqueue(
            subject, lambda view: [d for d in [self._put(view, target, notice)] if d]
        )
        return any(d.status is Status.PENDING for d in stored)

    @staticmethod
    def _put(view: ScheduleView, target: Target, notice: Notice) -> Delivery | None:
        """Store one notice under the rules: subscribed, not a repeat, cooldown for firing."""
        if notice.kind not in target.kinds or view.exists(notice.kind, notice.dedupe_key):
            return None
        cooling = (
            not notice.resolved
            and notice.kind not in _NO_COOLDOWN
            and target.cooldown > timedelta(0)
            and view.cooling(notice.kind, notice.created_at - target.cooldown)
        )
        return view.insert(notice, Status.SUPPRESSED if cooling else Status.PENDING)

    def _enqueue(
        self, subject: NoticeSubject, plan: Callable[[ScheduleView], list[Delivery]]
    ) -> list[Delivery]:
        with self.store.schedule(subject) as view:
            stored = plan(view)
        for delivery in stored:
            if delivery.status is Status.SUPPRESSED:
                self._report(
                    delivery,
                    "suppressed",
                    f"cooldown: a {delivery.kind.value} notice was queued or sent recently",
                )
        if any(d.status is Status.PENDING for d in stored):
            self.wake()
        return stored

    # ---- delivery (async) --------------------------------------------------------------------

    def _report(self, delivery: Delivery, result: Result, detail: str) -> None:
        metrics.NOTIFICATIONS.labels(delivery.kind.value, result).inc()
        try:
            self._on_outcome(delivery, result, detail)
        except Exception:
            log.exception("on_outcome failed for notification %s", delivery.id)

    async def deliver_due(self) -> int:
        """One delivery pass: claim the due notices, POST them, record each outcome; returns
        how many were attempted. Raises HistoryError when the store is unreachable."""
        now = self._clock()
        due = await asyncio.to_thread(
            self.store.claim_due, now, lease=self.lease, limit=self._batch
        )
        if not due:
            return 0
        gate = asyncio.Semaphore(self._concurrency)

        async def one(delivery: Delivery) -> None:
            async with gate:
                await self._deliver(delivery)

        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            outcome = await self._try(delivery)
        except Exception as exc:  # a bug must not stop the other deliveries
            log.exception("notification %s: delivery try failed", delivery.id)
            outcome = _Try("retried", f"internal error: {type(exc).__name__}")
        now = self._clock()
        status, next_at, sent_at = Status.PENDING, now, None
        detail = outcome.detail
        result = outcome.result
        if result == "sent":
            status, sent_at = Status.SENT, now
        elif result == "retried" and delivery.attempts >= self.max_attempts:
            status, result = Status.FAILED, "failed"
            detail = f"gave up after {delivery.attempts} attempts: {detail}"
        elif result == "retried":
            delay = retry_delay(
                delivery.attempts,
                base=self.retry_base,
                cap=self.retry_cap,
                retry_after=outcome.retry_after,
                jitter=self._jitter,
            )
            next_at = now + delay
            detail = (
                f"{detail}; attempt {delivery.attempts} of {self.max_attempts}, "
                f"next in {delay.total_seconds():.3g}s"
            )
        else:
            status = Status.FAILED
        try:
            done = await asyncio.to_thread(
                self.store.finish,
                delivery.id,
                status=status,
                next_attempt_at=next_at,
                sent_at=sent_at,
                last_error=None if status is Status.SENT else detail,
            )
        except Exception as exc:
            # The lease runs out and the notice is tried again: at least once, maybe twice.
            log.warning(
                "notification %s (%s) %s, but recording it failed: %s",
                delivery.id,
                delivery.kind.value,
                result,
                exc,
            )
            return
        where = f"{delivery.namespace}/{delivery.schedule_name}"
        level = logging.INFO if result == "sent" else logging.WARNING
        log.log(
            level,
            "notification %s (%s of %s via Secret %s key %s) %s: %s",
            delivery.id,
            delivery.kind.value,
            where,
            delivery.secret_name,
            delivery.secret_key,
            result,
            detail,
        )
        await asyncio.to_thread(self._report, done or delivery, result, detail)

    async def _try(self, delivery: Delivery) -> _Try:
        if delivery.secret_name not in self.webhook_secrets:
            # Checked again here, not only in validation: the outbox may hold notices from
            # before the settings changed. Nothing is read, so nothing about the Secret is told.
            return _Try(
                "failed",
                f"Secret {delivery.secret_name} is not one the cluster admin allows for webhooks",
            )
        secret = f"Secret {delivery.namespace}/{delivery.secret_name} key {delivery.secret_key}"
        try:
            raw = await asyncio.to_thread(
                self._resolve_url, delivery.namespace, delivery.secret_name, delivery.secret_key
            )
        except LookupError as exc:
            return _Try("retried", f"webhook URL not found: {exc}")
        except Exception as exc:
            # An API error's text may hold a response body; its status code is enough.
            status = getattr(exc, "status", None)
            code = f" (HTTP {status})" if isinstance(status, int) else ""
            return _Try("retried", f"reading {secret}: {type(exc).__name__}{code}")
        url = _webhook_url(raw) if isinstance(raw, str) else None
        if url is None:
            return _Try("failed", f"{secret} does not hold an http(s) URL")
        return await self._post(delivery, url)

    async def _destination(self, url: httpx.URL) -> Destination | _Try:
        """The webhook host resolved once and every address checked, or why not."""
        host = url.raw_host.decode("ascii")
        try:
            destination = await asyncio.to_thread(
                resolve, host, url.port or default_port(url.scheme), self._resolver
            )
        except ResolveError:
            return _Try("retried", "cannot resolve the webhook's host")
        for address in destination.addresses:
            try:
                check_address(
                    address, allow_private=self.allow_private, setting=ALLOW_PRIVATE_SETTING
                )
            except BlockedAddressError as exc:
                if destination.literal:
                    return _Try("failed", f"refused: {exc}")
                # The tenant wrote the name, not what it resolves to: that stays unsaid.
                return _Try("failed", f"refused: the webhook's host is {exc.reason}{exc.hint}")
        if url.scheme == "http" and not (
            self.allow_private
            and all(classify(a) in UNLOCKED_BY_ALLOW_PRIVATE for a in destination.addresses)
        ):
            return _Try(
                "failed",
                "refused: webhook URLs must be https (http only to private addresses, with "
                f"{ALLOW_PRIVATE_SETTING})",
            )
        return destination

    async def _post(self, delivery: Delivery, url: httpx.URL) -> _Try:
        body = json.dumps(render_body(delivery), ensure_ascii=False, separators=(",", ":"))
        try:
            async with asyncio.timeout(self.timeout):
                destination = await self._destination(url)
                if isinstance(destination, _Try):
                    return destination
                headers = {
                    "Host": destination.host_header(url.scheme),
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    "X-Nocturne-Delivery": str(delivery.id),
                    "X-Nocturne-Event": delivery.kind.value,
                }
                sni = destination.sni_hostname(url.scheme)
                extensions = {"sni_hostname": sni} if sni is not None else {}
                failure: httpx.TransportError | None = None
                for address in destination.addresses[:MAX_ADDRESSES_TRIED]:
                    pinned = url.copy_with(host=str(address))
                    try:
                        code, retry_after = await self._send(
                            pinned, body.encode(), headers, extensions
                        )
                    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                        failure = exc
                        continue
                    return _answer(code, retry_after)
        except TimeoutError:
            return _Try("retried", f"no answer within {self.timeout:g}s")
        except httpx.TransportError as exc:
            return _Try("retried", _transport_failure(exc))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return _Try("failed", type(exc).__name__)
        return _Try("retried", _transport_failure(failure) if failure else "cannot connect")

    async def _send(
        self, url: httpx.URL, body: bytes, headers: dict[str, str], extensions: dict[str, str]
    ) -> tuple[int, float | None]:
        """POST to one checked address; the status code and Retry-After seconds. The body of
        the answer is never read. One client per connection: a pooled TLS connection verified
        for one name must never carry a request for another name on the same address."""
        if self._tls is None:  # built once: loading the CA bundle takes milliseconds
            self._tls = httpx.create_ssl_context()
        async with httpx.AsyncClient(
            verify=self._tls,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(self.timeout),
        ) as client:
            request = client.build_request(
                "POST", url, content=body, headers=headers, extensions=extensions
            )
            response = await client.send(request, stream=True)
            await response.aclose()
            return response.status_code, _retry_after(response.headers.get("Retry-After"))

    # ---- the loop ----------------------------------------------------------------------------

    async def purge_old(self) -> int:
        """At most hourly: drop finished notices older than the retention (the outbox is not
        an archive; a failure notice older than that is not "recovered" from any more)."""
        now = self._clock()
        if self._purged_at is not None and now - self._purged_at < timedelta(hours=1):
            return 0
        purged = await asyncio.to_thread(self.store.purge, now - self.retention)
        self._purged_at = now
        if purged:
            log.info("purged %d notifications older than %s", purged, self.retention)
        return purged

    def wake(self) -> None:
        """Start a delivery pass now (thread-safe; a no-op before run() started)."""
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(event.set)

    async def run(self, wake: asyncio.Event, idle: float = 5.0) -> None:
        """Deliver forever: a pass, then wait for ``wake`` or ``idle`` seconds. Errors (e.g.
        the database down) are logged and the loop backs off up to a minute; only
        cancellation ends it."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake
        failures = 0
        try:
            while True:
                wake.clear()
                attempted = 0
                try:
                    attempted = await self.deliver_due()
                    await self.purge_old()
                    failures = 0
                except HistoryError as exc:
                    failures += 1
                    log.warning("notification delivery paused: %s", exc)
                except Exception:
                    failures += 1
                    log.exception("notification delivery pass failed")
                if attempted >= self._batch:
                    continue  # more may be due
                pause = min(idle * 2**failures, max(idle, 60.0)) if failures else idle
                try:
                    async with asyncio.timeout(pause):
                        await wake.wait()
                except TimeoutError:
                    pass
        finally:
            self._loop = None
            self._wake = None


def _answer(code: int, retry_after: float | None) -> _Try:
    """What a webhook's HTTP answer means: 2xx sent; 408, 425, 429 and 5xx worth a retry;
    anything else (other 4xx, a redirect) final. Only the code is told, with its standard
    phrase: the receiver's own reason phrase and body are its words, not ours to relay."""
    try:
        status = f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        status = f"HTTP {code}"
    if 200 <= code < 300:
        return _Try("sent", f"HTTP {code}")
    if code in (408, 425, 429) or code >= 500:
        return _Try("retried", status, retry_after)
    if 300 <= code < 400:
        return _Try("failed", f"{status} (redirects are not followed)")
    return _Try("failed", status)


def _transport_failure(exc: httpx.TransportError) -> str:
    """A failed connection in words of our own: the exception's type and, for a refused or
    unreachable address, the OS's reason. Never the exception's text, which may quote what
    the receiver sent (h11 quotes a malformed status line) or the URL."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"{type(exc).__name__}: TLS handshake failed"
        if isinstance(cause, OSError) and cause.errno:
            # The errno's own words: asyncio's messages name the address connected to.
            return f"{type(exc).__name__}: {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds of a numeric Retry-After header (the HTTP-date form is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
