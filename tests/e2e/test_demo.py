"""`make demo` is one of the README's two commands: it must bring everything up, show a run that
succeeded, and `make demo-down` must leave nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.cluster import build, controlplane
from prerequisites import skip_or_fail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_up_shows_a_successful_run_and_down_stops_everything(tmp_path: Path) -> None:
    if os.environ.get("NOCTURNE_E2E_KUBECONFIG"):
        pytest.skip("the demo brings up its own local control plane, not kind")
    if build.go_binary() is None:
        skip_or_fail("the demo needs the Go toolchain to build kube-local")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    state = tmp_path / "demo"
    demo = [sys.executable, "-m", "e2e.cluster.demo"]
    try:
        up = subprocess.run(
            [*demo, "up", "--dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        [row] = [line for line in up.stdout.splitlines() if line.startswith("daily-ai-news ")]
        assert "Succeeded" in row
        assert "Active" in row
        pids = json.loads((state / "demo.json").read_text())
        assert set(pids) == {"executor", "operator"}
    finally:
        down = subprocess.run(
            [*demo, "down", "--dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert not any(controlplane.alive(pid) for pid in pids.values())
    assert not controlplane.is_up(state)
    assert not (state / "database.json").exists()
