"""``web_fetch``: HTTP GET of a public page, with limits and an SSRF guard.

- only ``http``/``https``, no credentials in URLs, no proxies from the environment;
- the host is resolved once, every address is checked (``agent_runner.addresses``), and the
  connection goes to a checked address (the URL's host is replaced by the IP; ``Host`` and TLS SNI
  keep the name, so certificates are verified against the name). A DNS answer that changes
  between check and connect (rebinding) therefore cannot redirect the connection;
- redirects are followed by hand (at most ``max_redirects``), each hop checked the same way;
- at most ``max_bytes`` of (decompressed) body are read;
- one wall-clock deadline covers the whole fetch — DNS, connect, TLS, headers, body, every
  redirect hop. httpx's timeouts apply to each socket operation, so a server dripping a byte at a
  time would never trip them: a watchdog shuts the connection down when the deadline passes;
- HTML becomes plain text (``html_text``); other text types are returned as they are; binary
  content is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from agent_runner import __version__
from agent_runner.addresses import (
    BlockedAddressError,
    Destination,
    IPNetwork,
    ResolveError,
    Resolver,
    check_address,
    default_port,
    resolve,
    system_resolver,
)
from agent_runner.tools.html_text import html_to_text

MAX_BYTES = 512 * 1024
TIMEOUT = 20.0
MAX_REDIRECTS = 5
MAX_ADDRESSES_TRIED = 3
USER_AGENT = f"nocturne-runner/{__version__} (scheduled background agent)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/xml",
        "application/rss+xml",
        "application/atom+xml",
        "application/xhtml+xml",
        "application/javascript",
    }
)
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


class WebFetchError(Exception):
    """The page could not be fetched; the message is meant for the model."""


class WebFetchRefusedError(WebFetchError):
    """The fetch is not allowed (SSRF guard, scheme, credentials): a recorded refusal."""


@dataclass(frozen=True)
class WebPage:
    """A fetched page. ``url`` is the final URL after redirects."""

    url: str
    status: int
    content_type: str
    title: str | None
    text: str
    truncated: bool  # the body was longer than the fetcher's byte limit


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    destination: Destination


def parse_url(url: str) -> httpx.URL:
    """``url`` parsed, its host decoded once; WebFetchError for anything httpx cannot represent.
    httpx parses lazily: a malformed IDNA label (``xn--``) raises IDNAError only when ``.host``
    is read, and a lone surrogate raises UnicodeEncodeError while quoting — both ValueErrors."""
    try:
        parsed = httpx.URL(url)
        _ = parsed.host
        str(parsed).encode()
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise WebFetchError(f"{url!r}: not a valid URL: {exc!r}") from exc
    return parsed


def _fetch_error(target: _Target, exc: Exception) -> WebFetchError:
    """What the model is told about a failed request."""
    if isinstance(exc, WebFetchError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return WebFetchError(f"{target.url}: timed out")
    if isinstance(exc, httpx.HTTPError):
        return WebFetchError(f"{target.url}: {type(exc).__name__}: {exc}")
    # A hostile Location: httpx parses it even when not following redirects (``http://xn--/``
    # raises IDNAError inside ``stream``), and so does ``join``.
    return WebFetchError(f"{target.url}: malformed response: {exc!r}")


class _Watchdog:
    """Shuts a fetch's connections down when its deadline passes, whatever they are waiting for.
    Sockets come from httpcore's ``trace`` extension right after connect; a duplicate descriptor
    is kept, so the shutdown reaches the connection after TLS has wrapped the original."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` callback: keep every connection the fetch opens."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sockets.append(sock.dup())
            if self.fired:
                self._shutdown(self._sockets[-1])

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by the peer or by httpx
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv in the fetching thread


class WebFetcher:
    """Fetches pages under the SSRF guard and the size, time and redirect limits."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allow_networks: Sequence[IPNetwork] = (),
        max_bytes: int = MAX_BYTES,
        timeout: float = TIMEOUT,
        max_redirects: int = MAX_REDIRECTS,
        resolver: Resolver = system_resolver,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow_private = allow_private
        self.allow_networks = tuple(allow_networks)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self._resolver = resolver
        self._transport = transport
        self._clock = clock
        self._tls: ssl.SSLContext | None = None

    def fetch(self, url: str, *, deadline: float | None = None) -> WebPage:
        """GET ``url``; WebFetchRefusedError when the guard refuses it, WebFetchError on failure.
        ``deadline`` (``time.monotonic()`` seconds) shortens the fetcher's own timeout."""
        end = self._clock() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        current = url
        for _ in range(self.max_redirects + 1):
            target = self._target(current, end)
            result = self._get(target, end)
            if isinstance(result, WebPage):
                return result
            current = result
        raise WebFetchError(f"{url}: more than {self.max_redirects} redirects")

    def _resolve(self, host: str, port: int, end: float) -> Destination:
        """``resolve`` within the fetch's deadline (the system resolver has its own, longer one)."""
        remaining = end - self._clock()
        if remaining <= 0:
            raise WebFetchError(f"{host}: timed out")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(resolve, host, port, self._resolver).result(timeout=remaining)
        except concurrent.futures.TimeoutError as exc:
            raise WebFetchError(f"{host}: timed out resolving the host name") from exc
        except ResolveError as exc:
            raise WebFetchError(str(exc)) from exc
        finally:
            pool.shutdown(wait=False)

    def _target(self, url: str, end: float) -> _Target:
        parsed = parse_url(url)
        if parsed.scheme not in ("http", "https"):
            raise WebFetchRefusedError(f"{parsed}: only http and https URLs can be fetched")
        if not parsed.raw_host:
            raise WebFetchError(f"{url!r}: the URL has no host")
        if parsed.userinfo:
            raise WebFetchRefusedError(f"{parsed.host}: URLs with credentials are not fetched")
        host = parsed.raw_host.decode("ascii")
        port = parsed.port or default_port(parsed.scheme)
        destination = self._resolve(host, port, end)
        for address in destination.addresses:
            try:
                check_address(
                    address,
                    allow_private=self.allow_private,
                    allow_networks=self.allow_networks,
                    setting="NOCTURNE_WEB_FETCH_ALLOW_PRIVATE",
                )
            except BlockedAddressError as exc:
                shown = host if destination.literal else f"{host} resolves to an address that"
                raise WebFetchRefusedError(
                    f"{url}: refused by the SSRF guard: {shown} is not public: {exc}"
                ) from exc
        return _Target(parsed, destination)

    def _get(self, target: _Target, end: float) -> WebPage | str:
        scheme = target.url.scheme
        headers = {
            "host": target.destination.host_header(scheme),
            "user-agent": USER_AGENT,
            "accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5",
            "accept-encoding": "gzip, deflate",
        }
        extensions = {}
        sni = target.destination.sni_hostname(scheme)
        if sni is not None:
            extensions["sni_hostname"] = sni
        failure: Exception | None = None
        for address in target.destination.addresses[:MAX_ADDRESSES_TRIED]:
            remaining = end - self._clock()
            if remaining <= 0:
                break
            with _Watchdog(remaining) as watchdog:
                try:
                    result = self._attempt(
                        target,
                        str(address),
                        headers=headers,
                        extensions={**extensions, "trace": watchdog.trace},
                        remaining=remaining,
                        end=end,
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    failure, result = exc, None
                except (WebFetchError, httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
                    if watchdog.fired:
                        raise WebFetchError(f"{target.url}: timed out") from exc
                    raise _fetch_error(target, exc) from exc
                if watchdog.fired:  # a cut connection can look like a complete short body
                    raise WebFetchError(f"{target.url}: timed out")
                if result is not None:
                    return result
        if failure is None:
            raise WebFetchError(f"{target.url}: timed out")
        raise WebFetchError(f"{target.url}: cannot connect ({type(failure).__name__})")

    def _attempt(
        self,
        target: _Target,
        address: str,
        *,
        headers: dict[str, str],
        extensions: dict[str, Any],
        remaining: float,
        end: float,
    ) -> WebPage | str:
        if self._tls is None:  # built once: loading the CA bundle takes milliseconds
            self._tls = httpx.create_ssl_context()
        # One client per connection: a pooled TLS connection verified for one name must never
        # carry a request for another name on the same IP.
        with (
            httpx.Client(
                transport=self._transport,
                verify=self._tls,
                trust_env=False,
                follow_redirects=False,
                timeout=httpx.Timeout(remaining, connect=min(5.0, remaining)),
            ) as client,
            client.stream(
                "GET", target.url.copy_with(host=address), headers=headers, extensions=extensions
            ) as response,
        ):
            return self._read(target, response, end)

    def _read(self, target: _Target, response: httpx.Response, end: float) -> WebPage | str:
        if response.status_code in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise WebFetchError(f"{target.url}: redirect without a Location header")
            return str(target.url.join(location))
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and not (content_type.startswith("text/") or content_type in _TEXT_TYPES):
            raise WebFetchError(f"{target.url}: content type {content_type} is not text")
        coding = response.headers.get("content-encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            decoder = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)
        elif coding in ("", "identity"):
            decoder = None
        else:
            raise WebFetchError(f"{target.url}: content encoding {coding} is not supported")
        body = bytearray()
        truncated = False
        try:
            for raw in response.iter_raw():
                if self._clock() > end:
                    raise WebFetchError(f"{target.url}: timed out while reading")
                # Decompress at most one byte past the limit: no decompression bombs.
                room = self.max_bytes - len(body) + 1
                body += decoder.decompress(raw, room) if decoder else raw[:room]
                if len(body) > self.max_bytes:
                    del body[self.max_bytes :]
                    truncated = True
                    break
        except zlib.error as exc:
            raise WebFetchError(f"{target.url}: corrupt {coding} body") from exc
        charset = response.charset_encoding or "utf-8"
        try:
            text = bytes(body).decode(charset, errors="replace")
        except LookupError:
            text = bytes(body).decode("utf-8", errors="replace")
        text = text.replace("\x00", "")
        title = None
        looks_html = not content_type and text.lstrip()[:15].lower().startswith(
            ("<!doctype", "<html")
        )
        if content_type in _HTML_TYPES or looks_html:
            title, text = html_to_text(text)
        return WebPage(
            url=str(target.url),
            status=response.status_code,
            content_type=content_type or "unknown",
            title=title,
            text=text,
            truncated=truncated,
        )


def web_fetch(
    url: str,
    *,
    allow_private: bool = False,
    deadline: float | None = None,
    max_bytes: int = MAX_BYTES,
    timeout: float = TIMEOUT,
) -> WebPage:
    """Fetch ``url`` with the default limits and the SSRF guard (see the module docstring)."""
    fetcher = WebFetcher(allow_private=allow_private, max_bytes=max_bytes, timeout=timeout)
    return fetcher.fetch(url, deadline=deadline)
