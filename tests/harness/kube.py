"""Small typed helpers for e2e tests: the cluster handle, polling, and JSON views of objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from harness import controlplane

T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """What tests need to know about the cluster under test."""

    kubeconfig: Path
    server: str
    state_dir: Path
    local: controlplane.ControlPlane | None  # None against kind

    def log_tails(self) -> str:
        """Tails of the local components' logs (empty against kind)."""
        if self.local is None:
            return ""
        return "\n".join(self.local.log_tail(c) for c in controlplane.COMPONENTS)


@dataclass(frozen=True)
class Kubectl:
    """kubectl bound to one kubeconfig; JSON results come back as plain dicts."""

    binary: Path
    kubeconfig: Path

    def __call__(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        """Run kubectl; return stdout; raise AssertionError with stderr on failure."""
        result = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        """``kubectl get ... -o json`` parsed."""
        return json.loads(self("get", *args, "-o", "json"))

    def items(self, *args: str) -> list[dict[str, Any]]:
        """The ``items`` of a ``kubectl get`` list."""
        items: list[dict[str, Any]] = self.json(*args)["items"]
        return items

    def apply(self, namespace: str, manifest: dict[str, Any]) -> str:
        """``kubectl apply`` one manifest (YAML on stdin) in ``namespace``."""
        return self("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))

    def create_secret(self, namespace: str, name: str, **data: str) -> None:
        """``kubectl create secret generic`` with one literal per key."""
        literals = [f"--from-literal={key}={value}" for key, value in data.items()]
        self("create", "secret", "generic", name, "-n", namespace, *literals)


def healthy(port: int) -> bool:
    """True when ``http://127.0.0.1:<port>/healthz`` answers 200 (kopf's liveness endpoint)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def cluster_cli(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` as ``make`` runs it; output is captured."""
    tests = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(tests)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
