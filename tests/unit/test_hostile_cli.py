"""Hostile input to the CLI: files that bomb, mislead or smuggle escape sequences end in one clear
line naming the file, never a traceback or a hang (issue 12)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from nocturne_operator.cli.main import main

GOOD = {
    "apiVersion": "nocturne.dev/v1alpha1",
    "kind": "AgentSchedule",
    "metadata": {"name": "ok"},
    "spec": {
        "schedule": "@daily",
        "task": {"query": "q"},
        "agent": {"model": "offline-demo", "provider": "offline"},
        "budget": {"maxPerRunUSD": "1.00"},
    },
}

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
apiVersion: nocturne.dev/v1alpha1
kind: AgentSchedule
metadata: {name: bomb}
spec:
  schedule: "@daily"
  task: {query: q, context: {x: *i}}
  agent: {model: offline-demo, provider: offline}
  budget: {maxPerRunUSD: "1.00"}
"""


def validate_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes
) -> tuple[int, list[str], Path]:
    path = tmp_path / "in.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code = main(["validate", "-q", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.splitlines(), path


def test_an_alias_bomb_is_refused_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, out, path = validate_file(tmp_path, capsys, BILLION_LAUGHS)
    assert time.monotonic() - started < 2
    assert code == 1
    assert out == [
        f"{path}: cannot read YAML: anchors and aliases (&, *) are not accepted in manifests, "
        "line 2"
    ]


def test_an_oversized_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, path = validate_file(tmp_path, capsys, "# " + "x" * (9 * 2**20) + "\n")
    assert code == 1
    assert out == [f"{path}: cannot read YAML: larger than 8388608 bytes"]


def test_deep_nesting_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, path = validate_file(tmp_path, capsys, "[" * 100_000)
    assert code == 1
    assert len(out) == 1
    assert out[0].startswith(f"{path}: cannot read YAML: ")


def test_a_file_that_is_not_utf8_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, path = validate_file(tmp_path, capsys, b"kind: AgentSchedule\nx: \xff\xfe\n")
    assert code == 1
    assert out == [f"{path}: cannot read YAML: not UTF-8 text (byte 0xff at offset 23)"]


def test_metadata_that_is_a_string_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {**GOOD, "metadata": "x"}
    code, out, path = validate_file(tmp_path, capsys, yaml.safe_dump(doc))
    assert code == 1
    assert out == [f'{path}: AgentSchedule/#1: metadata "x": must be a mapping']


@pytest.mark.parametrize(
    ("kind", "api_version"),
    [
        ("AgentSchedul", "nocturne.dev/v1alpha1"),
        ("agentschedule", "nocturne.dev/v1alpha1"),
        ("AgentSchedules", "v1"),
        ("Agentschedule", "apps/v1"),
        (None, "nocturne.dev/v1alpha1"),
    ],
)
def test_a_kind_typo_is_reported_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str | None, api_version: str
) -> None:
    doc: dict[str, Any] = {**GOOD, "apiVersion": api_version}
    if kind is None:
        del doc["kind"]
    else:
        doc["kind"] = kind
    code, out, path = validate_file(tmp_path, capsys, yaml.safe_dump(doc))
    assert code == 1
    if kind is None:
        assert out == [f"{path}#1: kind: required (kubectl refuses a document without one)"]
    else:
        assert out == [f"{path}#1: kind {kind!r}: unknown kind; did you mean AgentSchedule?"]


def test_other_kinds_are_still_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    code, out, _ = validate_file(tmp_path, capsys, yaml.safe_dump_all([GOOD, other]))
    assert (code, out) == (0, [])


def test_cost_with_a_zone_directory_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg://u:p@127.0.0.1:1/x"
    assert main(["cost", "s", "--tz", "America", "--database-url", url]) == 2
    assert capsys.readouterr().out == "--tz 'America': not an IANA zone\n"
