"""`nocturne validate` and `nocturne next-runs`: offline, one line per error, stable exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nocturne_operator.cli.main import _already, main

EXAMPLES = Path(__file__).parents[2] / "docs" / "examples"


def write(tmp_path: Path, name: str, *docs: object) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def schedule(name: str, expr: str, zone: str = "UTC") -> dict[str, object]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": expr,
            "timeZone": zone,
            "task": {"query": "q"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "1.00"},
        },
    }


def test_examples_validate(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert all(line.endswith(": valid") for line in out)


def test_one_line_per_error_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "mixed.yaml",
        schedule("ok", "@daily"),
        schedule("spam", "*/5 * * * *"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}},
    )
    assert main(["validate", "-q", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f'{path}: AgentSchedule/spam: spec.schedule "*/5 * * * *": runs as often as every '
        "5 min (in UTC), minimum interval is 60 min"
    ]


def test_cluster_limits_from_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.yaml", schedule("frequent", "*/5 * * * *"))
    assert main(["--min-interval-minutes", "5", "validate", "-q", str(path)]) == 0
    assert capsys.readouterr().out == ""


def test_cluster_limits_from_a_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "s.yaml", schedule("frequent", "*/30 * * * *"))
    settings = tmp_path / "settings.yaml"
    settings.write_text("min_interval_minutes: 30\n")
    assert main(["--config", str(settings), "validate", "-q", str(path)]) == 0
    settings.write_text("min_interval_minutes: zero\n")
    assert main(["--config", str(settings), "validate", str(path)]) == 2
    assert "min_interval_minutes 'zero'" in capsys.readouterr().out


def test_bad_yaml_and_wrong_api_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    old = write(tmp_path, "old.yaml", {**schedule("x", "@daily"), "apiVersion": "nocturne.dev/v1"})
    assert main(["validate", str(broken), str(old)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{broken}: cannot read YAML:")
    assert out[1] == (
        f"{old}: AgentSchedule/x: apiVersion 'nocturne.dev/v1': expected 'nocturne.dev/v1alpha1'"
    )


def test_no_schedules_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "none.yaml", {"apiVersion": "v1", "kind": "Namespace"})
    assert main(["validate", str(path)]) == 1
    assert "no AgentSchedule documents found" in capsys.readouterr().out


def test_next_runs_across_spring_forward_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "ny.yaml", schedule("ny", "30 2 * * *", "America/New_York"))
    code = main(
        [
            "next-runs",
            str(path),
            "--count",
            "3",
            "--after",
            "2026-03-07T12:00:00-05:00",
            "-o",
            "json",
        ]
    )
    assert code == 0
    [item] = json.loads(capsys.readouterr().out)
    # 02:30 does not exist on 8 March 2026 in New York: the CronJob controller skips that day.
    assert item["runs"] == [
        {"utc": "2026-03-09T06:30:00Z", "local": "2026-03-09 02:30 EDT (-04:00)"},
        {"utc": "2026-03-10T06:30:00Z", "local": "2026-03-10 02:30 EDT (-04:00)"},
        {"utc": "2026-03-11T06:30:00Z", "local": "2026-03-11 02:30 EDT (-04:00)"},
    ]


def test_next_runs_table_and_bad_after(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "tokyo.yaml", schedule("tokyo", "0 9 * * *", "Asia/Tokyo"))
    assert (
        main(["next-runs", str(path), "--count", "1", "--after", "2026-11-26T12:00:00+00:00"]) == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        "tokyo  '0 9 * * *'  Asia/Tokyo",
        "  2026-11-27T00:00:00Z  2026-11-27 09:00 JST (+09:00)",
    ]
    assert main(["next-runs", str(path), "--after", "2026-11-26T12:00:00"]) == 2
    assert "needs a UTC offset" in capsys.readouterr().out


def _schedule(suspend: bool = False, **status: object) -> dict[str, object]:
    return {
        "metadata": {"name": "digest", "annotations": {"nocturne.dev/suspend-reason": "audit"}},
        "spec": {"suspend": suspend},
        "status": status,
    }


@pytest.mark.parametrize(
    ("command", "body", "unchanged"),
    [
        ("pause", _schedule(), None),
        ("pause", _schedule(suspend=True), "is already paused (audit)"),
        ("resume", _schedule(suspend=True), None),
        ("resume", _schedule(autoPause={"job": "digest-1"}), None),
        ("resume", _schedule(), "is not paused"),
        (
            "resume",
            _schedule(
                conditions=[
                    {"type": "BudgetExhausted", "status": "True", "message": "cost in 2026-12"}
                ]
            ),
            "is not paused but held by its budget (cost in 2026-12); a resume does not lift a "
            "budget hold",
        ),
    ],
)
def test_pausing_twice_or_resuming_what_is_not_paused_changes_nothing(
    command: str, body: dict[str, object], unchanged: str | None
) -> None:
    assert _already(command, body) == unchanged


def aspol(name: str, selector: dict[str, object], **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedulePolicy",
        "metadata": {"name": name},
        "spec": {"namespaceSelector": selector, **spec},
    }


def in_namespace(body: dict[str, object], namespace: str) -> dict[str, object]:
    body["metadata"] = {**body["metadata"], "namespace": namespace}  # type: ignore[dict-item]
    return body


def test_policies_in_the_files_apply_by_the_namespaces_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GitOps repository keeps policies and Namespaces next to the schedules: validate checks
    each schedule as the cluster will, and names the policy that refused it."""
    path = write(
        tmp_path,
        "repo.yaml",
        aspol("sre", {"matchLabels": {"team": "sre"}}, limits={"minIntervalMinutes": 5}),
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "sre", "labels": {"team": "sre"}}},
        in_namespace(schedule("check", "*/5 * * * *"), "sre"),
        in_namespace(schedule("news", "*/5 * * * *"), "research"),
    )  # fmt: skip
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: AgentSchedule/check: valid",
        f'{path}: AgentSchedule/news: spec.schedule "*/5 * * * *": runs as often as every 5 min '
        "(in UTC), minimum interval is 60 min",
    ]
    # A namespace not among the files: its labels from the command line.
    assert main(["validate", "-q", "--namespace-labels", "team=sre", str(path)]) == 0


def test_a_broken_policy_in_the_files_is_an_error_and_a_bad_label_flag_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        "policy.yaml",
        aspol("cap", {}, namespaceBudget={"maxMonthlyUSD": "10", "timeZone": "Mars/Olympus"}),
    )
    assert main(["validate", str(path)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f'{path}: AgentSchedulePolicy/cap: spec.namespaceBudget.timeZone "Mars')
    assert main(["validate", "--namespace-labels", "team", str(path)]) == 2
    assert "'team' is not key=value" in capsys.readouterr().out


def test_a_policy_selecting_by_the_namespaces_name_applies_without_its_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_name: dict[str, object] = {"matchLabels": {"kubernetes.io/metadata.name": "sre"}}
    path = write(
        tmp_path,
        "repo.yaml",
        aspol("sre", by_name, limits={"minIntervalMinutes": 5}),
        in_namespace(schedule("check", "*/5 * * * *"), "sre"),
    )
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{path}: AgentSchedule/check: valid"]
    # The other labels are unknown: said, on stderr.
    assert "the labels of namespace sre are unknown" in captured.err


def test_a_hostile_schedule_next_to_a_policy_is_an_error_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {**schedule("x", "@daily"), "metadata": "x"}
    path = write(tmp_path, "mixed.yaml", aspol("p", {}), bad)
    assert main(["validate", "-q", "--namespace-labels", "", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f'{path}: AgentSchedule/#2: metadata "x": must be a mapping'
    ]
