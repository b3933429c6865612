"""Tools without a network: SSRF classification and pinning, HTML text, the tool policy."""

from __future__ import annotations

import gzip
import ipaddress
import time
from collections.abc import Sequence

import httpx
import pytest

from agent_runner.addresses import (
    LINK_LOCAL,
    LOOPBACK,
    METADATA,
    MULTICAST,
    PRIVATE,
    RESERVED,
    SHARED,
    UNSPECIFIED,
    BlockedAddressError,
    check_address,
    classify,
    resolve,
)
from agent_runner.config import AgentSpec
from agent_runner.providers import ToolCall
from agent_runner.tools import WebFetcher, WebFetchError, WebFetchRefusedError, build_tools
from agent_runner.tools.html_text import html_to_text
from agent_runner.tools.registry import (
    MAX_RESULT_CHARS,
    REASON_NOT_ALLOWED,
    REASON_NOT_AVAILABLE,
    REASON_SSRF,
)

PUBLIC_IP = "93.184.215.14"


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),  # mapped public IPv4
        ("64:ff9b::808:808", None),  # NAT64 of a public IPv4
        ("127.0.0.1", LOOPBACK),
        ("127.1.2.3", LOOPBACK),
        ("::1", LOOPBACK),
        ("::ffff:127.0.0.1", LOOPBACK),
        ("10.0.0.1", PRIVATE),
        ("172.16.5.4", PRIVATE),
        ("192.168.1.1", PRIVATE),
        ("fd00::1", PRIVATE),  # IPv6 ULA
        ("fd00:ec2::254", METADATA),  # AWS's IPv6 metadata endpoint, inside the ULA range
        ("fd20:ce::254", METADATA),  # Google Cloud's IPv6 metadata endpoint
        ("fc00::1", PRIVATE),
        ("fec0::1", PRIVATE),  # deprecated site-local
        ("::ffff:10.1.2.3", PRIVATE),
        ("64:ff9b::a00:1", PRIVATE),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", PRIVATE),  # 6to4 of 10.0.0.1
        ("169.254.169.254", METADATA),
        ("::ffff:169.254.169.254", METADATA),
        ("64:ff9b::a9fe:a9fe", METADATA),  # NAT64 of 169.254.169.254
        ("169.254.170.2", METADATA),  # AWS ECS task credentials
        ("169.254.1.1", LINK_LOCAL),
        ("fe80::1", LINK_LOCAL),
        ("fe80::1%eth0", LINK_LOCAL),
        ("100.64.0.1", SHARED),  # CGNAT
        ("100.100.100.200", METADATA),  # Alibaba Cloud, inside the CGNAT range
        ("::ffff:100.100.100.200", METADATA),
        ("192.0.0.192", METADATA),  # Oracle Cloud (legacy)
        ("168.63.129.16", METADATA),  # Azure WireServer, a public address
        ("224.0.0.1", MULTICAST),
        ("ff02::1", MULTICAST),
        ("0.0.0.0", UNSPECIFIED),  # noqa: S104 - an address under test, nothing binds
        ("0.1.2.3", UNSPECIFIED),
        ("::", UNSPECIFIED),
        ("240.0.0.1", RESERVED),
        ("255.255.255.255", RESERVED),
        ("::127.0.0.1", RESERVED),  # deprecated IPv4-compatible
    ],
)
def test_classify(address: str, category: str | None) -> None:
    assert classify(ipaddress.ip_address(address)) == category


def test_allow_private_unlocks_private_but_never_link_local() -> None:
    setting = "NOCTURNE_WEB_FETCH_ALLOW_PRIVATE"
    for address in ("127.0.0.1", "10.0.0.1", "::1", "fd00::1", "100.64.0.1"):
        ip = ipaddress.ip_address(address)
        with pytest.raises(BlockedAddressError, match=setting):
            check_address(ip, setting=setting)
        check_address(ip, allow_private=True)
    never = ("169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0", "240.0.0.1")  # noqa: S104
    for address in never:
        with pytest.raises(BlockedAddressError) as excinfo:
            check_address(ipaddress.ip_address(address), allow_private=True, setting=setting)
        assert setting not in str(excinfo.value)


METADATA_ENDPOINTS = (
    "169.254.169.254",
    "fd00:ec2::254",
    "100.100.100.200",
    "::ffff:100.100.100.200",
    "64:ff9b::6464:64c8",  # NAT64 of 100.100.100.200
    "fd20:ce::254",
    "192.0.0.192",
    "168.63.129.16",
)


@pytest.mark.parametrize("address", METADATA_ENDPOINTS)
def test_nothing_unlocks_metadata_endpoints(address: str) -> None:
    ip = ipaddress.ip_address(address)
    everything = [ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")]
    with pytest.raises(BlockedAddressError, match="cloud metadata endpoint") as excinfo:
        check_address(ip, allow_private=True, allow_networks=everything, setting="X_ALLOW")
    assert "X_ALLOW" not in str(excinfo.value)
    assert excinfo.value.reason == METADATA


def test_explicit_networks_never_unlock_link_local() -> None:
    allowed = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10")]
    for address in ("169.254.1.1", "fe80::1"):
        with pytest.raises(BlockedAddressError, match="link-local"):
            check_address(ipaddress.ip_address(address), allow_networks=allowed)


def test_metadata_endpoints_are_refused_by_web_fetch_even_with_allow_private() -> None:
    seen: list[httpx.Request] = []
    fetcher = WebFetcher(
        allow_private=True,
        resolver=FakeResolver(["fd00:ec2::254"]),
        transport=_recording_transport(seen, {}),
    )
    for url in ("http://100.100.100.200/latest/meta-data/", "http://metadata.example/"):
        with pytest.raises(WebFetchRefusedError, match="cloud metadata endpoint"):
            fetcher.fetch(url)
    assert seen == []


def test_resolve_pins_and_names_the_host() -> None:
    named = resolve("hooks.example", 8443, FakeResolver(["10.0.0.1", "10.0.0.2"]))
    assert named.addresses == (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"))
    assert not named.literal
    assert named.host_header("https") == "hooks.example:8443"
    assert named.sni_hostname("https") == "hooks.example"
    assert named.sni_hostname("http") is None
    literal = resolve("::1", 443, FakeResolver([]))
    assert literal.literal
    assert literal.host_header("https") == "[::1]"
    assert literal.sni_hostname("https") is None


def test_allow_networks_are_exact() -> None:
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    check_address(ipaddress.ip_address("127.0.0.1"), allow_networks=allowed)
    with pytest.raises(BlockedAddressError):
        check_address(ipaddress.ip_address("127.0.0.2"), allow_networks=allowed)
    with pytest.raises(BlockedAddressError):
        check_address(ipaddress.ip_address("::1"), allow_networks=allowed)


def test_html_to_text_strips_scripts_styles_and_markup() -> None:
    html = """<!doctype html><html><head><title> Prices &amp; plans </title>
    <style>body { color: red }</style><script>alert("x")</script></head>
    <body><nav>Home</nav><h1>Plans</h1><p>Basic:   <b>10&nbsp;USD</b></p>
    <ul><li>One</li><li>Two</li></ul><noscript>enable js</noscript>
    <template><p>hidden</p></template><svg><text>logo</text></svg>
    <p>caf&eacute; &#8364;5<br>next line</p></body></html>"""
    title, text = html_to_text(html)
    assert title == "Prices & plans"
    assert text == "Home\n\nPlans\n\nBasic: 10 USD\n\nOne\n\nTwo\n\ncafé €5\nnext line"
    for hidden in ("color: red", "alert", "enable js", "hidden", "logo"):
        assert hidden not in text


def test_html_to_text_survives_broken_markup() -> None:
    title, text = html_to_text("<p>open <b>bold <script>x = '</p>'; <p>tail")
    assert title is None
    assert text == "open bold"


class FakeResolver:
    """Answers from a script; records lookups (DNS rebinding: the answer changes each time)."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _response(
    status: int, body: bytes | str = b"", headers: dict[str, str] | None = None
) -> httpx.Response:
    """A response streamed like one from the network (MockTransport reads plain content)."""
    data = body.encode() if isinstance(body, str) else body
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(data))


def _recording_transport(
    seen: list[httpx.Request], responses: dict[str, httpx.Response]
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses.get(request.url.path) or _response(404, "nope")

    return httpx.MockTransport(handle)


def test_connection_is_pinned_to_the_checked_address() -> None:
    seen: list[httpx.Request] = []
    page = _response(200, "<title>T</title><p>ok</p>", {"content-type": "text/html"})
    resolver = FakeResolver([PUBLIC_IP], ["127.0.0.1"])  # rebinding after the check
    fetcher = WebFetcher(resolver=resolver, transport=_recording_transport(seen, {"/": page}))
    result = fetcher.fetch("https://news.example.com/")
    assert result.text == "ok"
    assert result.url == "https://news.example.com/"
    (request,) = seen
    assert request.url.host == PUBLIC_IP
    assert request.headers["host"] == "news.example.com"
    assert request.extensions["sni_hostname"] == "news.example.com"
    assert resolver.lookups == ["news.example.com"]  # resolved once, connected to that answer


def test_redirect_hops_are_resolved_and_checked_again() -> None:
    seen: list[httpx.Request] = []
    responses = {"/start": _response(302, headers={"location": "http://inner.example/x"})}
    resolver = FakeResolver([PUBLIC_IP], ["10.0.0.7"])
    fetcher = WebFetcher(resolver=resolver, transport=_recording_transport(seen, responses))
    with pytest.raises(WebFetchRefusedError, match=r"inner.example resolves to .* 10.0.0.7"):
        fetcher.fetch("http://outer.example:8080/start")
    assert len(seen) == 1
    assert seen[0].headers["host"] == "outer.example:8080"
    assert resolver.lookups == ["outer.example", "inner.example"]


def test_any_blocked_address_refuses_the_host() -> None:
    fetcher = WebFetcher(resolver=FakeResolver([PUBLIC_IP, "169.254.169.254"]))
    with pytest.raises(WebFetchRefusedError, match="cloud metadata endpoint"):
        fetcher.fetch("http://mixed.example/")


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("file:///etc/passwd", WebFetchRefusedError, "only http and https"),
        ("ftp://example.com/x", WebFetchRefusedError, "only http and https"),
        ("http://user:pw@example.com/", WebFetchRefusedError, "credentials"),
        ("http://127.0.0.1/", WebFetchRefusedError, "127.0.0.1 is not public"),
        ("http://[::1]:8080/", WebFetchRefusedError, "loopback"),
        ("http://169.254.169.254/latest/meta-data/", WebFetchRefusedError, "metadata endpoint"),
        ("http://[::ffff:a9fe:a9fe]/", WebFetchRefusedError, "metadata endpoint"),
        ("http://169.254.1.1/", WebFetchRefusedError, "link-local"),
        ("http://10.0.0.1/", WebFetchRefusedError, "private"),
        ("http://0.0.0.0:80/", WebFetchRefusedError, "unspecified"),
        ("http:///nohost", WebFetchError, "no host"),
    ],
)
def test_refused_urls_never_connect(url: str, error: type[Exception], match: str) -> None:
    seen: list[httpx.Request] = []
    fetcher = WebFetcher(
        resolver=FakeResolver(["127.0.0.1"]), transport=_recording_transport(seen, {})
    )
    with pytest.raises(error, match=match):
        fetcher.fetch(url)
    assert seen == []


def test_localhost_names_are_judged_by_their_addresses() -> None:
    fetcher = WebFetcher(resolver=FakeResolver(["127.0.0.1", "::1"]))
    with pytest.raises(WebFetchRefusedError, match="localhost resolves to"):
        fetcher.fetch("http://localhost:8080/")


def test_resolution_failures_are_fetch_errors() -> None:
    def failing(host: str, port: int) -> Sequence[str]:
        raise OSError("no such host")

    with pytest.raises(WebFetchError, match="cannot resolve"):
        WebFetcher(resolver=failing).fetch("http://nowhere.example/")
    with pytest.raises(WebFetchError, match="no addresses"):
        WebFetcher(resolver=FakeResolver([])).fetch("http://empty.example/")


def test_decompression_is_capped() -> None:
    bomb = gzip.compress(b"A" * (8 * 1024 * 1024))
    responses = {
        "/": _response(200, bomb, {"content-encoding": "gzip", "content-type": "text/plain"})
    }
    fetcher = WebFetcher(
        resolver=FakeResolver([PUBLIC_IP]),
        transport=_recording_transport([], responses),
        max_bytes=1000,
    )
    page = fetcher.fetch("http://bomb.example/")
    assert page.truncated
    assert len(page.text) == 1000


def test_binary_content_and_unknown_encodings_are_refused() -> None:
    responses = {
        "/pdf": _response(200, b"%PDF", {"content-type": "application/pdf"}),
        "/br": _response(200, b"x", {"content-type": "text/plain", "content-encoding": "br"}),
    }
    fetcher = WebFetcher(
        resolver=FakeResolver([PUBLIC_IP]), transport=_recording_transport([], responses)
    )
    with pytest.raises(WebFetchError, match="application/pdf is not text"):
        fetcher.fetch("http://files.example/pdf")
    with pytest.raises(WebFetchError, match="encoding br is not supported"):
        fetcher.fetch("http://files.example/br")


def _agent(**fields: object) -> AgentSpec:
    data: dict[str, object] = {"model": "m", "provider": "offline", "maxSteps": 3}
    data.update(fields)
    return AgentSpec.model_validate(data)


def _call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(id="1", name=name, arguments=arguments)


def test_restricted_operations_are_refused_unless_allowed() -> None:
    deadline = time.monotonic() + 10
    tools = build_tools(_agent(tools=["web_fetch"]))
    assert [spec.name for spec in tools.specs] == ["web_fetch"]
    result = tools.execute(_call("send_email", to="a@b.c"), step=2, deadline=deadline)
    assert result.is_error
    assert result.text.startswith("Refused: send_email is a restricted operation")
    assert result.refusal is not None
    assert result.refusal.as_dict() == {
        "tool": "send_email",
        "reason": REASON_NOT_ALLOWED,
        "detail": "send_email is a restricted operation and this schedule does not allow it in "
        "background runs (spec.agent.allowRestrictedOperations)",
        "step": 2,
    }
    # Listed in tools without the opt-in (the operator would refuse such a schedule): refused.
    unguarded = build_tools(_agent(tools=["purchase"]))
    refused = unguarded.execute(_call("purchase", item="x"), step=1, deadline=deadline)
    assert refused.refusal is not None
    assert refused.refusal.reason == REASON_NOT_ALLOWED


def test_allowed_restricted_operations_say_they_are_not_available() -> None:
    tools = build_tools(_agent(tools=["send_email"], allowRestrictedOperations=["send_email"]))
    assert [spec.name for spec in tools.specs] == ["send_email"]
    result = tools.execute(_call("send_email"), step=1, deadline=time.monotonic() + 10)
    assert result.is_error
    assert "not available in this runner version; nothing was done" in result.text
    assert result.refusal is not None
    assert result.refusal.reason == REASON_NOT_AVAILABLE


def test_unknown_tools_and_bad_arguments_are_tool_errors() -> None:
    deadline = time.monotonic() + 10
    tools = build_tools(_agent())
    assert tools.specs == ()
    assert (
        "no tool 'web_fetch'" in tools.execute(_call("web_fetch"), step=1, deadline=deadline).text
    )
    fetch = build_tools(_agent(tools=["web_fetch"]))
    missing = fetch.execute(_call("web_fetch"), step=1, deadline=deadline)
    assert missing.text == "Error: web_fetch needs a string argument 'url'."
    garbled = ToolCall(id="1", name="web_fetch", arguments_error="arguments are not valid JSON")
    assert fetch.execute(garbled, step=1, deadline=deadline).is_error


def test_web_fetch_results_are_formatted_clipped_and_refusals_recorded() -> None:
    deadline = time.monotonic() + 10
    long_page = _response(200, "word " * 10_000, {"content-type": "text/plain"})
    fetcher = WebFetcher(
        resolver=FakeResolver([PUBLIC_IP]),
        transport=_recording_transport([], {"/long": long_page}),
    )
    tools = build_tools(_agent(tools=["web_fetch"]), fetcher=fetcher)
    result = tools.execute(
        _call("web_fetch", url="http://x.example/long"), step=1, deadline=deadline
    )
    assert not result.is_error
    assert result.text.startswith(
        "URL: http://x.example/long\nStatus: 200\nContent-Type: text/plain"
    )
    assert len(result.text) <= MAX_RESULT_CHARS + 100
    assert result.text.endswith("characters]")
    missing = tools.execute(
        _call("web_fetch", url="http://x.example/gone"), step=1, deadline=deadline
    )
    assert missing.is_error
    assert "Status: 404" in missing.text
    blocked = tools.execute(_call("web_fetch", url="http://10.0.0.1/"), step=3, deadline=deadline)
    assert blocked.refusal is not None
    assert blocked.refusal.reason == REASON_SSRF
    assert blocked.refusal.step == 3
