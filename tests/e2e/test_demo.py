"""`make demo` is one of the README's two commands: it must bring everything up, show a run that
succeeded, and `make demo-down` must leave nothing running."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import build, controlplane
from harness import node as real_node
from harness.kube import cluster_cli
from harness.prerequisites import skip_or_fail

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_up_shows_a_successful_run_and_down_stops_everything(tmp_path: Path) -> None:
    if os.environ.get("NOCTURNE_E2E_KUBECONFIG"):
        pytest.skip("the demo brings up its own local control plane, not kind")
    if build.go_binary() is None:
        skip_or_fail("the demo needs the Go toolchain to build kube-local")
    state = tmp_path / "demo"
    try:
        up = cluster_cli("e2e.demo", "up", "--dir", str(state), timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        [row] = [line for line in up.stdout.splitlines() if line.startswith("daily-ai-news ")]
        assert "Succeeded" in row
        assert "Active" in row
        # The digest itself, as `nocturne show` prints it piped (the output alone).
        found = up.stdout.split("(nocturne show daily-ai-news -n demo):\n", 1)[1]
        digest = found.split("\nExplore:", 1)[0].strip()
        assert digest, up.stdout
        assert "show:" not in digest, digest  # not an error of the CLI
        pids = json.loads((state / "demo.json").read_text())
        assert set(pids) == {"operator"}
        assert real_node.running_at(state / "node")
    finally:
        down = cluster_cli("e2e.demo", "down", "--dir", str(state), timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(controlplane.alive(pid) for pid in pids.values())
    assert not controlplane.is_up(state)
    assert not real_node.running_at(state / "node")
    assert not [r for r in real_node.records() if r.state_dir == str(state / "node")]
    assert not (state / "database.json").exists()
