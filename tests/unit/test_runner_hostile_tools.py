"""Hostile tool calls: whatever the model sends (or a page it read makes it send), the tool layer
answers with a tool result or a tool error the model can be sent back — never an exception, and
within bounded time. Nothing leaves the machine: DNS is a stub and HTTP an in-process transport.

Deterministic: the properties run under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import cycle
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_runner.config import RESTRICTED_OPERATIONS
from agent_runner.contract import json_document
from agent_runner.providers import ToolCall
from agent_runner.tools import ToolRegistry, WebFetcher, WebFetchError, WebPage
from agent_runner.tools.registry import Refusal

PROFILE = settings(max_examples=300, derandomize=True, database=None, deadline=None)
PUBLIC_IP = "93.184.215.14"
TIME_LIMIT = 2.0  # seconds for one tool call without a network: generous for a slow CI machine

# Every code point, lone surrogates included: json.loads('"\\udcff"') gives the model one.
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
HOSTS = st.one_of(
    st.sampled_from(
        [
            "xn--",
            "xn--a",
            "xn--a.com",
            "xn--zz-.example",
            "a..b",
            "-a-.com",
            "a" * 64 + ".com",
            ("a" * 63 + ".") * 5,
            "example.com",
            "exa mple.com",
            "127.0.0.1",
            "[::1]",
            "[::ffff:169.254.169.254]",
            "[fe80::1%25eth0]",
            "[::1",
            "0x7f.1",
            "2130706433",
            "\udcff",
            "a\ud800.com",
            "bücher.example",
            "\u200b.example",
            "",
        ]
    ),
    ANY_TEXT,
)
URLS = st.one_of(
    st.builds(
        lambda scheme, userinfo, host, port, path: f"{scheme}{userinfo}{host}{port}{path}",
        st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "file://", "//", "http:", ""]),
        st.sampled_from(["", "user:pw@", "@", "\udcff@"]),
        HOSTS,
        st.sampled_from(["", ":80", ":0", ":99999", ":-1", ":x", ":"]),
        st.one_of(st.sampled_from(["", "/", "/a?b#c", "/%zz", "/\udcff", "/\x00"]), ANY_TEXT),
    ),
    ANY_TEXT,
)
TOOL_NAMES = st.one_of(
    st.sampled_from(["web_fetch", *sorted(RESTRICTED_OPERATIONS), "finish"]), ANY_TEXT
)
ARGUMENTS = st.one_of(
    st.fixed_dictionaries({"url": st.one_of(URLS, JSON_VALUES)}),
    st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=4),
)
# What a hostile server answers (redirects to hostile Locations, odd types and encodings).
RESPONSES = st.lists(
    st.builds(
        lambda status, location, ctype, body: httpx.Response(
            status,
            headers=[
                *([(b"location", location)] if location is not None else []),
                *([(b"content-type", ctype)] if ctype is not None else []),
            ],
            content=body,
        ),
        st.sampled_from([200, 204, 301, 302, 404, 500, 599]),
        st.one_of(
            st.none(),
            st.binary(max_size=30),
            URLS.map(lambda url: url.encode("utf-8", "backslashreplace")),
        ),
        st.one_of(
            st.none(),
            st.sampled_from([b"text/html", b"text/plain; charset=nope", b"image/png", b"\xff"]),
        ),
        st.binary(max_size=200),
    ),
    min_size=1,
    max_size=4,
)


class StubResolver:
    """DNS without a network: every name resolves to ``addresses``."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)

    def __call__(self, host: str, port: int) -> list[str]:
        return list(self.addresses)


def offline_registry(responses: Sequence[httpx.Response] = ()) -> ToolRegistry:
    """All tools of a run, ``allow_private`` off, answering from ``responses`` in turn."""
    answers = cycle(responses or [httpx.Response(200, text="<p>hi</p>")])

    def handle(request: httpx.Request) -> httpx.Response:
        answer = next(answers)  # streamed like one from the network, not pre-read
        return httpx.Response(
            answer.status_code, headers=answer.headers, stream=httpx.ByteStream(answer.content)
        )

    fetcher = WebFetcher(
        resolver=StubResolver([PUBLIC_IP]), transport=httpx.MockTransport(handle), timeout=1.0
    )
    return ToolRegistry(
        tools=["web_fetch", *sorted(RESTRICTED_OPERATIONS)],
        allow_restricted=["purchase"],
        fetcher=fetcher,
    )


def assert_answered(registry: ToolRegistry, call: ToolCall) -> None:
    started = time.monotonic()
    result = registry.execute(call, step=1, deadline=started + 1.0)
    assert time.monotonic() - started < TIME_LIMIT
    assert isinstance(result.text, str)
    assert result.text
    # The catch-all in ToolRegistry.execute is a last resort: known hostile input is handled
    # where it arrives.
    assert not result.text.startswith(f"Error: the tool {call.name!r} failed (")
    result.text.encode()  # it goes back to the model as UTF-8
    if result.refusal is not None:
        result.refusal.detail.encode()
        # The refusal goes into the final report's metadata: JSONB must be able to hold it.
        json_document("metadata", {"refusals": [result.refusal.as_dict()]})


@pytest.mark.parametrize(
    "url",
    [
        "http://xn--/",
        "http://xn--a.com/",
        "https://xn--zz-.example/x",
        "http://example.com/\udcff",
        "http://example.com/?q=\ud800",
        "http://\udcff/",
    ],
)
def test_malformed_urls_are_tool_errors(url: str) -> None:
    with pytest.raises(WebFetchError, match="not a valid URL"):
        offline_registry().fetcher.fetch(url)
    result = offline_registry().execute(
        ToolCall("1", "web_fetch", {"url": url}), step=1, deadline=time.monotonic() + 1
    )
    assert result.is_error
    assert result.text.startswith("Error: ")
    result.text.encode()


@pytest.mark.parametrize("location", [b"http://[::1", b"http://xn--/", b"//\x80/", b"http://a:b/"])
def test_a_redirect_to_a_malformed_location_is_a_tool_error(location: bytes) -> None:
    registry = offline_registry([httpx.Response(302, headers=[(b"location", location)])])
    with pytest.raises(WebFetchError):
        registry.fetcher.fetch("http://example.com/")


def test_a_refusal_is_storable_whatever_its_texts_hold() -> None:
    """Refusals go into the final report's metadata, which JSONB must hold: a NUL or a lone
    surrogate in a refusal's texts would get the whole report refused. Today's refusals carry
    validated URLs and fixed names; the record does not rely on that."""
    record = Refusal("send_email\x00", "not allowed", "http://a/\udcff\x00", 1).as_dict()
    assert (record["tool"], record["detail"]) == ("send_email\ufffd", "http://a/?\ufffd")
    json_document("metadata", {"refusals": [record]})


def test_an_unforeseen_failure_is_a_tool_error_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(WebFetcher):
        def fetch(self, url: str, *, deadline: float | None = None) -> WebPage:
            raise KeyError(url)

    registry = ToolRegistry(tools=["web_fetch"], allow_restricted=[], fetcher=Broken())
    result = registry.execute(
        ToolCall("1", "web_fetch", {"url": "http://a/"}), step=1, deadline=time.monotonic() + 1
    )
    assert result.is_error
    assert result.text == "Error: the tool 'web_fetch' failed (KeyError)."
    assert "tool 'web_fetch' failed" in caplog.text


@PROFILE
@given(
    name=TOOL_NAMES,
    arguments=ARGUMENTS,
    arguments_error=st.one_of(st.none(), ANY_TEXT),
    responses=RESPONSES,
)
def test_property_random_tool_calls_are_always_answered(
    name: str,
    arguments: dict[str, Any],
    arguments_error: str | None,
    responses: list[httpx.Response],
) -> None:
    call = ToolCall("call-1", name, arguments, arguments_error=arguments_error)
    assert_answered(offline_registry(responses), call)


@PROFILE
@given(url=URLS, responses=RESPONSES)
def test_property_the_fetcher_raises_only_its_own_errors(
    url: str, responses: list[httpx.Response]
) -> None:
    started = time.monotonic()
    try:
        page = offline_registry(responses).fetcher.fetch(url, deadline=started + 1.0)
    except WebFetchError:
        pass
    else:
        assert isinstance(page, WebPage)
        page.url.encode()
    assert time.monotonic() - started < TIME_LIMIT
