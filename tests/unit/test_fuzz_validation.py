"""Fuzzing ``validate()`` and ``nocturne validate`` (issue 12): random documents end in field-named
errors and random files in one line per problem, never an exception or a traceback, within a
deadline. The table-driven cases are in test_hostile_validation.py and test_hostile_cli.py.

Deterministic: the properties run under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
from collections.abc import Iterator
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nocturne_operator.cli.main import EXIT_INVALID, EXIT_OK, main
from nocturne_operator.prices import load_price_table
from nocturne_operator.schedule.validation import FieldError, validate
from unit.test_validation import NOW, SETTINGS, schedule

# The deadline is per example and generous for a slow CI machine: a year of cron ticks in the
# worst zone takes well under 0.1 s. The CLI reads its settings and price table every time.
PROFILE = settings(max_examples=300, derandomize=True, database=None, deadline=timedelta(seconds=2))
CLI_PROFILE = settings(PROFILE, max_examples=120)
PRICES = load_price_table()

# Every code point, lone surrogates included (a YAML "\ud800" escape gives one).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
SPEC_KEYS = [
    "schedule",
    "timeZone",
    "suspend",
    "task",
    "agent",
    "budget",
    "timeoutSeconds",
    "retries",
    "concurrencyPolicy",
    "startingDeadlineSeconds",
    "failurePolicy",
    "notifications",
    "query",
    "context",
    "stateKey",
    "model",
    "provider",
    "baseURL",
    "apiKeySecretRef",
    "tools",
    "allowRestrictedOperations",
    "maxSteps",
    "maxPerRunUSD",
    "maxTotalUSD",
    "maxMonthlyUSD",
    "pauseAfterConsecutiveFailures",
    "webhookSecretRef",
    "events",
    "cooldownMinutes",
    "format",
    "name",
    "key",
]
DOCUMENT_KEYS = ["apiVersion", "kind", "metadata", "spec", "status", "name", "namespace"]
# What YAML 1.1's safe loader makes of a scalar: also dates, timestamps, bytes (!!binary).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    ANY_TEXT,
    st.sampled_from(["", "0", "1.00", "2.00", "0.000001", "1e3", "600", "yes", "on", "@daily"]),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.binary(max_size=8),
)
# Keys a YAML mapping can have: text, numbers, booleans, null, dates, timestamps and bytes.
KEYS = st.one_of(
    st.sampled_from(SPEC_KEYS + DOCUMENT_KEYS),
    ANY_TEXT,
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.dates(),
    st.binary(max_size=4),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(KEYS, inner, max_size=5),
        st.frozensets(st.integers(), max_size=3).map(set),  # !!set
    ),
    max_leaves=15,
)
CRON_FIELDS = st.lists(
    st.sampled_from(
        [
            *("*", "*/5", "*/0", "0", "9", "59", "60", "1-5", "5-1", "1,2", "?", "L", "MON"),
            *("JAN", "-1", "1/0", "0-59/7", "", "\x00", "\ud800", "\u0663"),
        ]
    ),
    min_size=0,
    max_size=7,
).map(" ".join)
SCHEDULES = st.one_of(
    CRON_FIELDS,
    st.sampled_from(["@daily", "@hourly", "@yearly", "@reboot", "@every", "@every 1h"]),
    st.builds(
        lambda prefix, body: prefix + body,
        st.sampled_from(["@every ", "@every -", "TZ=UTC ", "CRON_TZ=Asia/Tokyo ", " "]),
        st.one_of(ANY_TEXT, st.sampled_from(["1h", "0s", "0.0001s", "90m", "1h30m", "1e9h"])),
    ),
    ANY_TEXT,
)
ZONES = st.one_of(
    st.sampled_from(
        [
            *("UTC", "Asia/Tokyo", "America", "America/", "Etc", "posix/UTC", "right/UTC"),
            *("Local", "localtime", "posixrules", "../etc/passwd", "Asia/Tokyo/x", "A" * 64),
        ]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_+\-]{0,8}(/[A-Za-z0-9_+\-]{1,8}){0,2}", fullmatch=True),
    ANY_TEXT,
)
USD = st.one_of(
    st.sampled_from(["0", "0.0", "0.000001", "2.00", "999999.999999", "1000000", "1e2", "-1"]),
    st.decimals(allow_nan=True).map(str),
    VALUES,
)
# Paths (under spec) a mutation replaces, with what goes there.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "schedule": SCHEDULES,
    "timeZone": ZONES,
    "budget.maxPerRunUSD": USD,
    "budget.maxTotalUSD": USD,
    "budget.maxMonthlyUSD": USD,
    "agent.model": st.one_of(st.sampled_from(["gpt-4o", "offline-demo", "x" * 129]), ANY_TEXT),
    "agent.provider": st.one_of(st.sampled_from(["openai", "anthropic", "offline", "OpenAI"])),
    "agent.baseURL": st.one_of(
        st.sampled_from(["http://", "https://x", "http://[::1", "http://xn--/", "https://a b"]),
        ANY_TEXT,
    ),
    "agent.tools": st.lists(st.sampled_from(["web_fetch", "purchase", "x"]), max_size=3),
    "agent.apiKeySecretRef": st.fixed_dictionaries({"name": ANY_TEXT, "key": ANY_TEXT}),
    "task.query": ANY_TEXT,
    "task.context": VALUES,
    "task.stateKey": ANY_TEXT,
    "notifications.events": st.lists(st.sampled_from(["Failed", "Alert", "on"]), max_size=3),
    "notifications.webhookSecretRef": VALUES,
}
DELETE = object()
MUTATIONS = st.lists(
    st.sampled_from(sorted(FIELDS)).flatmap(
        lambda path: st.tuples(st.just(path), st.one_of(FIELDS[path], VALUES, st.just(DELETE)))
    ),
    min_size=1,
    max_size=3,
)
DOCUMENTS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "apiVersion": st.one_of(st.just("nocturne.dev/v1alpha1"), VALUES),
            "kind": st.one_of(st.just("AgentSchedule"), VALUES),
            "metadata": st.one_of(st.fixed_dictionaries({"name": VALUES}), VALUES),
            "spec": st.one_of(st.dictionaries(st.sampled_from(SPEC_KEYS), VALUES), VALUES),
        },
    ),
    st.dictionaries(KEYS, VALUES, max_size=6),
)
ROOTS = ("metadata", "spec")


def mutated(mutations: list[tuple[str, Any]]) -> dict[str, Any]:
    """The valid example schedule with each (path under spec, value) applied."""
    body = copy.deepcopy(schedule())
    for path, value in mutations:
        node = body["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                node[part] = child = {}
            node = child
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return body


def assert_field_errors(body: Any) -> None:
    """validate() answers with a result: every error names a field under metadata or spec."""
    result = validate(body, SETTINGS, now=NOW, prices=PRICES)
    assert result.ok == (not result.errors)
    assert (result.spec is None) == bool(result.errors)
    for error in result.errors:
        assert isinstance(error, FieldError)
        assert error.field.startswith(ROOTS), error
        assert error.rule
        assert str(error).startswith(f"{error.field} " if error.has_value else f"{error.field}:")
    for warning in result.warnings:
        assert isinstance(warning, str)


@PROFILE
@given(body=DOCUMENTS)
# Found by this property: a value whose keys JSON cannot hold (YAML's dates, !!binary) raised
# TypeError while its error message was written.
@example(body={"metadata": {"name": {b"": None}}})
@example(body={"spec": {"schedule": {date(2026, 1, 1): "x"}}})
def test_property_random_documents_end_in_field_errors(body: dict[Any, Any]) -> None:
    assert_field_errors(body)


@PROFILE
@given(mutations=MUTATIONS)
def test_property_a_schedule_with_random_fields_ends_in_field_errors(
    mutations: list[tuple[str, Any]],
) -> None:
    assert_field_errors(mutated(mutations))


# ---- the CLI on random files ---------------------------------------------------------------

YAML_LINES = st.sampled_from(
    [
        "apiVersion: nocturne.dev/v1alpha1",
        "kind: AgentSchedule",
        "kind: AgentSchedul",
        "---",
        "...",
        "metadata: {name: digest}",
        "metadata: x",
        "spec:",
        "  schedule: '@daily'",
        "  timeZone: America",
        "  task: {query: q, context: {a: 1}}",
        "  agent: {model: offline-demo, provider: offline}",
        "  budget: {maxPerRunUSD: '1.00'}",
        "  budget: {maxPerRunUSD: 1.00}",
        "  suspend: yes",
        "  on: [Failed]",
        "? [a, b]\n: 1",
        "? {a: 1}\n: 1",
        "? !!binary aGk=\n: x",
        "2026-02-30: x",
        "x: 2026-02-30",
        "x: 2026-01-01 10:00:00 +99:00",
        "a: &a [1]",
        "b: *a",
        "<<: {a: 1}",
        "<<: 1",
        "!!python/object/apply:os.system ['true']",
        "%YAML 1.1",
        "%TAG ! tag:x,2000:",
        "x: !!set {a, b}",
        "x: !!omap [a: 1, b: 2]",
        "x: !!pairs [a: 1]",
        "x: !!int x",
        "x: !!float x",
        "x: !!timestamp x",
        "x: !!binary ???",
        'x: "\\ud800"',
        'x: "\\x00"',
        "x: 1e400",
        "x: .nan",
        "x: 0x_",
        "x: 0b2",
        "x: 1_000",
        "x: 190:20:30",
        "{",
        "[",
        "\t",
        "- a",
        "|",
        "\ufeff",
    ]
)
YAML_TEXTS = st.one_of(
    st.lists(st.one_of(YAML_LINES, ANY_TEXT), max_size=12).map("\n".join),
    DOCUMENTS.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True)),
    ANY_TEXT,
)
# Surrogates become invalid UTF-8 (the non-UTF-8 path), like any random bytes.
FILE_BYTES = st.one_of(
    YAML_TEXTS.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Fresh manifest paths (module scope: hypothesis reruns the test, not the fixture)."""
    folder = tmp_path_factory.mktemp("manifests")
    return (folder / f"in-{n}.yaml" for n in itertools.count())


def validate_file(path: Path, content: bytes) -> tuple[int, str, str]:
    """``nocturne validate FILE`` in-process: (exit code, stdout, stderr)."""
    path.write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, out.getvalue(), err.getvalue()


@CLI_PROFILE
@given(content=FILE_BYTES)
# Found by the property above: `nocturne validate` printed a traceback for this file.
@example(
    content=b"apiVersion: nocturne.dev/v1alpha1\nkind: AgentSchedule\n"
    b"metadata: {name: {2026-01-01: x}}\nspec: {schedule: {? !!binary aGk= : x}}\n"
)
def test_property_random_files_end_in_one_line_per_problem(
    files: Iterator[Path], content: bytes
) -> None:
    path = next(files)
    code, out, err = validate_file(path, content)
    assert code in {EXIT_OK, EXIT_INVALID}
    assert "Traceback" not in out + err
    lines = out.splitlines()
    assert lines
    for line in lines:
        # Each line names the file (and the document), then the field or the reason.
        assert line.startswith(f"{path}") or line == f"no AgentSchedule documents found in {path}"
    if code == EXIT_OK:
        assert all(line.endswith(": valid") for line in lines)


@CLI_PROFILE
@given(body=DOCUMENTS, mutations=st.one_of(st.none(), MUTATIONS))
def test_property_random_documents_as_yaml_files_end_in_one_line_per_problem(
    files: Iterator[Path], body: dict[Any, Any], mutations: list[tuple[str, Any]] | None
) -> None:
    document = body if mutations is None else mutated(mutations)
    try:
        text = yaml.safe_dump_all([document, schedule()], allow_unicode=True)
    except yaml.YAMLError:  # what PyYAML cannot write, such as a set of dates
        return
    path = next(files)
    code, out, err = validate_file(path, text.encode("utf-8", "surrogatepass"))
    assert code in {EXIT_OK, EXIT_INVALID}
    assert "Traceback" not in out + err
    assert out.splitlines()[-1] == f"{path}: AgentSchedule/daily-ai-news: valid"
