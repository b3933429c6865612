"""The test side: run the executor as a subprocess for the duration of a block
(``run_executor``) and find its files (``ExecutorProcess``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.executor.hostpaths import REPO_ROOT
from harness.executor.runs import pod_files_dir

TESTS_DIR = REPO_ROOT / "tests"


class ExecutorError(RuntimeError):
    """The executor subprocess failed to start or stop cleanly; the message has its log tail."""


@dataclass
class ExecutorProcess:
    """A running executor subprocess (from ``run_executor``) and where its files are."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    executor_log: Path

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """Directory of the pod's files (logs, termination message)."""
        return pod_files_dir(self.state_dir, namespace, pod)

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """The container's log file (stdout+stderr). Without ``container``: the pod's only log
        file; FileNotFoundError if there is none (yet) or several."""
        directory = self.pod_dir(namespace, pod)
        if container is not None:
            return directory / f"{container}.log"
        found = sorted(directory.glob("*.log"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected one container log in {directory}, found {[p.name for p in found]}"
            )
        return found[0]

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the executor's own log and of its stderr, for failure messages."""
        parts = []
        for path in (self.executor_log, self.state_dir / "executor.stderr"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)


def executor_command(
    kubeconfig: Path, state_dir: Path, ready_file: Path, images: Path | None = None
) -> list[str]:
    """The executor's command line; it creates ``ready_file`` once its first pod list is done."""
    command = [
        sys.executable,
        "-m",
        "harness.executor",
        "--kubeconfig",
        str(kubeconfig),
        "--state-dir",
        str(state_dir),
        "--ready-file",
        str(ready_file),
    ]
    return command if images is None else [*command, "--images", str(images)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The repository root must not be on sys.path (operator/ shadows the stdlib): import the
    # harness as harness from tests/, and keep python -m from adding the cwd.
    inherited = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and os.path.realpath(p) != str(REPO_ROOT)
    ]
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *inherited])
    env["PYTHONSAFEPATH"] = "1"
    return env


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM the process group, SIGKILL after ``timeout``; True if it stopped in time."""
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    return True


@contextlib.contextmanager
def run_executor(
    kubeconfig: Path,
    state_dir: Path,
    images: Path | None = None,
    *,
    ready_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> Iterator[ExecutorProcess]:
    """Run the executor as a subprocess (own process group) until the block ends.

    Waits for its ready file (first pod list done); on exit SIGTERMs it (SIGKILL after
    ``stop_timeout``). Raises ``ExecutorError`` with its log tail if it does not become ready
    or does not stop cleanly.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready"
    ready.unlink(missing_ok=True)
    with (state_dir / "executor.stderr").open("ab") as stderr:
        proc = subprocess.Popen(
            executor_command(kubeconfig, state_dir, ready, images),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_child_env(),
            start_new_session=True,
        )
    handle = ExecutorProcess(proc, state_dir, state_dir / "executor.log")
    deadline = time.monotonic() + ready_timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_process(proc, 5.0)
            raise ExecutorError(
                f"the pod executor did not become ready (exit code {proc.returncode}):\n"
                + handle.log_tail()
            )
        time.sleep(0.1)
    try:
        yield handle
    finally:
        clean = _stop_process(proc, stop_timeout)
        if not clean or proc.returncode != 0:
            raise ExecutorError(
                f"the pod executor did not stop cleanly (exit code {proc.returncode}):\n"
                + handle.log_tail()
            )
