"""web_fetch over real sockets: text extraction, limits, redirects, and SSRF refusals."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent_runner.tools import WebFetcher, WebFetchError, WebFetchRefusedError, web_fetch
from integration.llm_server import Reply, ScriptedServer, html_page, redirect, running

pytestmark = pytest.mark.integration

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.1/32")]


@pytest.fixture
def site() -> Iterator[ScriptedServer]:
    yield from running()


def loopback_fetcher(**kwargs: object) -> WebFetcher:
    """Treats the test server's 127.0.0.1 as if it were public, and nothing else."""
    return WebFetcher(allow_networks=LOOPBACK_ONLY, **kwargs)  # type: ignore[arg-type]


def test_fetches_html_as_text(site: ScriptedServer) -> None:
    site.route(
        "/pricing",
        html_page("<script>track()</script><h1>Plans</h1><p>Pro: <b>20 USD</b></p>", title="P"),
    )
    page = web_fetch(f"{site.url}/pricing", allow_private=True)
    assert (page.status, page.content_type, page.title) == (200, "text/html", "P")
    assert page.text == "Plans\n\nPro: 20 USD"
    assert not page.truncated
    (request,) = site.requests
    assert request.headers["host"] == f"127.0.0.1:{site.port}"
    assert request.headers["user-agent"].startswith("nocturne-runner/")


def test_loopback_is_refused_without_allow_private(site: ScriptedServer) -> None:
    site.route("/", html_page("secret admin page"))
    for url in (f"{site.url}/", f"http://localhost:{site.port}/"):
        with pytest.raises(WebFetchRefusedError, match="loopback"):
            web_fetch(url)
    with pytest.raises(WebFetchRefusedError, match="loopback"):
        web_fetch(f"http://[::1]:{site.port}/")
    assert site.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.0.1:8080/admin",
        "http://[::ffff:169.254.169.254]/",
    ],
)
def test_metadata_and_private_addresses_are_refused(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(WebFetchRefusedError, match="refused by the SSRF guard"):
        web_fetch(url)
    assert time.monotonic() - started < 0.5  # refused before any connection attempt


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",  # inside the ULA range allow_private opens
        "http://100.100.100.200/latest/meta-data/",  # inside the CGNAT range allow_private opens
    ],
)
def test_metadata_stays_refused_with_allow_private(url: str) -> None:
    with pytest.raises(WebFetchRefusedError, match="cloud metadata endpoint"):
        web_fetch(url, allow_private=True)


@pytest.mark.parametrize(
    "target",
    [
        "http://10.1.2.3/internal",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/",
        "http://127.0.0.2:{port}/",
    ],
)
def test_redirect_to_a_private_address_is_refused(site: ScriptedServer, target: str) -> None:
    site.route("/go", redirect(target.format(port=site.port)))
    with pytest.raises(WebFetchRefusedError, match="refused by the SSRF guard"):
        loopback_fetcher().fetch(f"{site.url}/go")
    assert [r.path for r in site.requests] == ["/go"]


def test_redirects_are_followed_within_the_limit(site: ScriptedServer) -> None:
    site.route("/a", redirect("/b", 301))
    site.route("/b", redirect(f"{site.url}/c", 307))
    site.route("/c", html_page("<p>final</p>"))
    page = loopback_fetcher().fetch(f"{site.url}/a")
    assert page.url == f"{site.url}/c"
    assert page.text == "final"
    for i in range(7):
        site.route(f"/loop{i}", redirect(f"/loop{i + 1}"))
    with pytest.raises(WebFetchError, match="more than 5 redirects"):
        loopback_fetcher().fetch(f"{site.url}/loop0")
    assert sum(r.path.startswith("/loop") for r in site.requests) == 6


def test_body_is_capped(site: ScriptedServer) -> None:
    site.route("/big", Reply(body=b"a" * (2 * 1024 * 1024), headers={"content-type": "text/plain"}))
    page = loopback_fetcher(max_bytes=512 * 1024).fetch(f"{site.url}/big")
    assert page.truncated
    assert len(page.text) == 512 * 1024


def test_slow_pages_time_out(site: ScriptedServer) -> None:
    site.route("/slow", Reply(delay=2.0, body=b"late", headers={"content-type": "text/plain"}))
    started = time.monotonic()
    with pytest.raises(WebFetchError, match="timed out"):
        loopback_fetcher(timeout=0.3).fetch(f"{site.url}/slow")
    with pytest.raises(WebFetchError, match="timed out"):
        loopback_fetcher().fetch(f"{site.url}/slow", deadline=time.monotonic() + 0.3)
    assert time.monotonic() - started < 1.5


class Dripper:
    """A raw TCP server that reads a request, then sends ``head`` and drips ``drip`` one byte
    every ``interval`` seconds: never idle long enough for a per-read timeout to fire."""

    def __init__(self, head: bytes, drip: bytes, interval: float = 0.05) -> None:
        self.head, self.drip, self.interval = head, drip, interval
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Dripper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.listener.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        with self.listener.accept()[0] as conn:
            conn.recv(65536)
            try:
                conn.sendall(self.head)
                for byte in self.drip:
                    if self.done.wait(self.interval):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:  # the fetcher hung up: what the test wants
                return


@pytest.mark.parametrize(
    ("head", "drip"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 1000),  # headers never end
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", b"b" * 1000),  # body
    ],
    ids=["headers", "body"],
)
def test_one_deadline_covers_a_dripping_response(head: bytes, drip: bytes) -> None:
    for limit in ({"timeout": 0.5}, {"deadline": 0.5}):
        with Dripper(head, drip) as server:
            started = time.monotonic()
            with pytest.raises(WebFetchError, match="timed out"):
                loopback_fetcher(timeout=limit.get("timeout", 20.0)).fetch(
                    f"http://127.0.0.1:{server.port}/",
                    deadline=started + limit["deadline"] if "deadline" in limit else None,
                )
            assert time.monotonic() - started < 0.5 + 0.4


def test_one_deadline_covers_name_resolution() -> None:
    def slow_dns(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["127.0.0.1"]

    started = time.monotonic()
    with pytest.raises(WebFetchError, match="timed out"):
        loopback_fetcher(resolver=slow_dns, timeout=0.5).fetch("http://slow-dns.example/")
    assert time.monotonic() - started < 0.5 + 0.4


def test_error_statuses_and_text_types(site: ScriptedServer) -> None:
    site.route("/missing", html_page("<p>No such page</p>", status=404))
    site.route("/data", Reply(json={"price": 20}))
    site.route("/image", Reply(body=b"\x89PNG", headers={"content-type": "image/png"}))
    missing = loopback_fetcher().fetch(f"{site.url}/missing")
    assert (missing.status, missing.text) == (404, "No such page")
    data = loopback_fetcher().fetch(f"{site.url}/data")
    assert (data.content_type, data.text) == ("application/json", '{"price": 20}')
    with pytest.raises(WebFetchError, match="image/png is not text"):
        loopback_fetcher().fetch(f"{site.url}/image")
