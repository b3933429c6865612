"""Fuzzing the run API's request bodies (issue 12), below HTTP: whatever bytes a pod sends as a
start, progress or finish body, the server's parser gives the contract's document or a 400
``ApiError`` naming the field, never another exception, and never echoes agent output or state.
The same bodies go to the real server over TLS in tests/integration/test_fuzz_runapi.py.

Deterministic: the properties run under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from agent_runner.contract import (
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    ApiError,
    FinishReport,
    ProgressReport,
    StartRequest,
)
from nocturne_operator.runapi.auth import RefusalError
from nocturne_operator.runapi.server import _error, _parse
from unit.test_fuzz_summary import JSON_VALUES, TIMES

PROFILE = settings(max_examples=200, derandomize=True, database=None, deadline=timedelta(seconds=1))
MODELS: dict[str, type[StartRequest | ProgressReport | FinishReport]] = {
    START_PATH: StartRequest,
    PROGRESS_PATH: ProgressReport,
    FINISH_PATH: FinishReport,
}
# The server never echoes these fields' values (agent output and state).
SECRET_FIELDS = ("output", "error", "state", "metadata", "alertReason", "activity")
SECRET = "s3cr3t-agent-output"  # noqa: S105 - a marker, not a password

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
# Text a pod might send: NULs, escapes, lone surrogates (json.dumps writes "\ud800").
TEXTS = st.one_of(
    ANY_TEXT,
    st.sampled_from(["", "\x00", "a\x00b", "\\u0000", "\ud800", "\u2028", "x" * 300, "é" * 201]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-2, max_value=3),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1]),
    st.floats(),
    st.sampled_from(["1", "1.0", "1e3", True]),
)
USD = st.one_of(
    st.sampled_from(["0", "0.10", "0.000001", "0.0000001", "99999999.999999", "100000000"]),
    st.sampled_from(["-0", "-1", "1e3", "1E-7", "NaN", "Infinity", " 1", "1 ", "0x1", "\u0661"]),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    NUMBERS,
)
JSON_WITH_NUL = st.one_of(
    JSON_VALUES,
    st.sampled_from(
        [{"a": "\x00"}, {"\x00": 1}, ["\x00"], {"a": float("nan")}, {"a": float("inf")}, "\x00"]
    ),
)
NAMES = st.one_of(
    st.sampled_from(["research", "daily", "daily-uid", "daily-1-uid", "a" * 254, "A", "a_b"]),
    TEXTS,
)
# Replacement values per field, plausible first; any JSON value is also tried for each.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "startedAt": TIMES,
    "completedAt": TIMES,
    "executionId": NUMBERS,
    "costUSD": USD,
    "inputTokens": NUMBERS,
    "outputTokens": NUMBERS,
    "steps": NUMBERS,
    "activity": TEXTS,
    "status": st.sampled_from(["SUCCEEDED", "FAILED", "RUNNING", "TIMED_OUT", "succeeded"]),
    "output": TEXTS,
    "error": TEXTS,
    "alert": st.sampled_from([True, False, 0, 1, "true", None]),
    "alertReason": TEXTS,
    "metadata": JSON_WITH_NUL,
    "state": JSON_WITH_NUL,
}
RUN_FIELDS = ("namespace", "schedule", "scheduleUID", "jobUID", "podUID")
DELETE = object()


def valid_body(path: str, run: Mapping[str, str], execution_id: int) -> dict[str, Any]:
    """A document the contract accepts for ``path``."""
    if path == START_PATH:
        return {"run": dict(run), "startedAt": "2026-11-27T09:00:00+09:00"}
    body: dict[str, Any] = {
        "run": dict(run),
        "executionId": execution_id,
        "costUSD": "0.10",
        "inputTokens": 100,
        "outputTokens": 50,
    }
    if path == FINISH_PATH:
        body |= {"status": "SUCCEEDED", "completedAt": "2026-11-27T09:05:00Z", "output": "ok"}
    return body


@st.composite
def near_valid_bodies(
    draw: st.DrawFn, path: str, run: Mapping[str, str], execution_id: int
) -> dict[str, Any]:
    """A valid body for ``path`` with a few fields (of the run too) replaced, removed or added."""
    body = valid_body(path, run, execution_id)
    names = [*sorted(FIELD_VALUES), "run", *(f"run.{name}" for name in RUN_FIELDS), "unknown"]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        key = name.removeprefix("run.")
        strategy = NAMES if name.startswith("run.") else FIELD_VALUES.get(name, JSON_VALUES)
        # Plausible values first: the bodies that get past the parser are the interesting ones.
        value = draw(st.one_of(strategy, strategy, strategy, JSON_VALUES, st.just(DELETE)))
        target = (
            body["run"] if name.startswith("run.") and isinstance(body.get("run"), dict) else body
        )
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    return body


def encoded(document: Any, ascii_only: bool) -> bytes:
    """JSON as a pod could send it: escaped or raw UTF-8 (a lone surrogate as its bytes)."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


RUN = {
    "namespace": "research",
    "schedule": "daily",
    "scheduleUID": "daily-uid",
    "jobUID": "daily-1-uid",
    "podUID": "daily-1-pod-uid",
}


def bodies(run: Mapping[str, str], execution_id: int) -> st.SearchStrategy[tuple[str, bytes]]:
    """(path, body): random bytes, random JSON, or a near-valid body for ``run`` (whole or cut
    short, as by a dropped connection)."""

    def for_path(path: str) -> st.SearchStrategy[bytes]:
        near = st.builds(encoded, near_valid_bodies(path, run, execution_id), st.booleans())
        return st.one_of(
            st.binary(max_size=300),
            st.builds(encoded, JSON_VALUES, st.booleans()),
            near,
            near,  # twice: the bodies that get past the parser are the interesting ones
            st.builds(lambda body, cut: body[:cut], near, st.integers(0, 200)),
        )

    return st.sampled_from(sorted(MODELS)).flatmap(
        lambda path: st.tuples(st.just(path), for_path(path))
    )


def assert_api_error(response_text: str, status: int) -> ApiError:
    """An ``ApiError`` body, as the server answers every refusal."""
    assert 400 <= status < 500, (status, response_text)
    assert "Traceback" not in response_text
    return ApiError.model_validate_json(response_text)


def parse_or_refuse(model: type[BaseModel], body: bytes) -> RefusalError | None:
    """What the server's parser does with ``body``: None when it accepts it."""
    try:
        document = _parse(model, body)  # type: ignore[type-var]
    except RefusalError as exc:
        return exc
    assert isinstance(document, model)
    document.model_dump_json()  # what it accepted, it can write back
    return None


@PROFILE
@given(path_and_body=bodies(RUN, 7))
def test_property_any_body_is_a_document_or_a_400_api_error(
    path_and_body: tuple[str, bytes],
) -> None:
    path, body = path_and_body
    model = MODELS[path]
    refusal = parse_or_refuse(model, body)
    try:
        model.model_validate_json(body)
    except ValidationError:
        assert refusal is not None
    else:
        assert refusal is None
        return
    assert (refusal.status, refusal.reason) == (400, "BadRequest")
    # The message names the document, then each field and rule (or "document" for bad JSON).
    assert refusal.message.startswith(f"{model.__name__}: ")
    assert len(refusal.message) > len(f"{model.__name__}: ")
    response = _error(refusal.status, refusal.reason, refusal.message)
    assert response.text is not None
    error = assert_api_error(response.text, response.status)
    assert error.reason == "BadRequest"


@PROFILE
@given(
    path=st.sampled_from([PROGRESS_PATH, FINISH_PATH]),
    field=st.sampled_from(SECRET_FIELDS),
    value=st.sampled_from(
        [SECRET, [SECRET], {"x": SECRET}, {SECRET: 1}, 7, SECRET + "x" * 5000, SECRET * 60]
    ),
    other=st.sampled_from(sorted(FIELD_VALUES)),
    other_value=JSON_VALUES,
)
def test_property_refusals_never_echo_agent_output_or_state(
    path: str, field: str, value: Any, other: str, other_value: Any
) -> None:
    body = valid_body(path, RUN, 7) | {other: other_value, field: value}
    refusal = parse_or_refuse(MODELS[path], encoded(body, ascii_only=False))
    if refusal is not None:
        assert SECRET not in refusal.message


@pytest.mark.parametrize("path", sorted(MODELS))
def test_the_valid_bodies_are_valid(path: str) -> None:
    assert parse_or_refuse(MODELS[path], encoded(valid_body(path, RUN, 7), True)) is None


@pytest.mark.parametrize(
    ("path", "fields", "named"),
    [
        # Found by tests/integration/test_fuzz_runapi.py: both were 500s from the database.
        (PROGRESS_PATH, {"executionId": 2**63}, "executionId 9223372036854775808: "),
        (FINISH_PATH, {"executionId": 2**63}, "executionId 9223372036854775808: "),
        (
            FINISH_PATH,
            {"metadata": {"a": "\x00"}},
            "metadata: Value error, metadata contains a NUL",
        ),
        (FINISH_PATH, {"metadata": {"a": float("nan")}}, "metadata: Value error, metadata is not"),
    ],
)
def test_what_the_database_cannot_store_is_a_400(
    path: str, fields: dict[str, Any], named: str
) -> None:
    refusal = parse_or_refuse(MODELS[path], encoded(valid_body(path, RUN, 7) | fields, True))
    assert refusal is not None
    assert (refusal.status, refusal.reason) == (400, "BadRequest")
    assert named in refusal.message
