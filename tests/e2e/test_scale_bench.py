"""bench/operator_scale.py (issue 13) runs end to end at a small N and prints every row of its
table. A smoke check of the bench only: it asserts no timing, only that the runs it drives
through the run API were all answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import build, postgres
from harness.prerequisites import skip_or_fail

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROWS = ("G1", "G2", "G3", "G4", "G5", "G11", "R")


def test_operator_scale_bench_prints_its_table_at_a_small_n(tmp_path: Path) -> None:
    if os.environ.get("NOCTURNE_E2E_KUBECONFIG"):
        pytest.skip("the bench brings up its own local control plane, not kind")
    if build.go_binary() is None:
        skip_or_fail("the bench needs the Go toolchain to build kube-local")
    try:
        postgres.bin_dir()
    except postgres.PostgresError as exc:
        skip_or_fail(str(exc))
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "operator_scale.py"),
            *("--n", "30", "--namespaces", "3", "--idle-n", "3", "--burst", "6"),
            *("--idle-seconds", "5", "--json", str(figures)),
            *("--runs", "6", "--run-schedules", "3", "--run-interval", "2", "--run-seconds", "4"),
        ],
        env={**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(REPO / "tests")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for row in ROWS:
        assert any(line.startswith(f"| {row} |") for line in result.stdout.splitlines()), (
            f"row {row} missing:\n{result.stdout}"
        )
    raw = json.loads(figures.read_text())
    # The runs went the real way (tokens the apiserver issued, verified by TokenReview, the
    # owner chain walked): every call answered, none refused.
    runs = raw["R"]["operator"]
    assert runs["errors"] == {}, runs["error_examples"]
    assert (runs["start"]["n"], runs["finish"]["n"]) == (6, 6), runs
