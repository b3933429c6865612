"""Measure the runner's start: process start -> first model request, and -> process exit.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/runner_start.py [runs]
Starts a private PostgreSQL (migrated like the Helm hook does) and a local OpenAI-compatible server,
writes a task document the way the operator renders it, then runs `python -m agent_runner` `runs`
times (default 5, after one unmeasured warm-up round) with the environment a Job's pod gets. The
first model request is timed by the server when it arrives, on the same clock as the process start.
Baselines, interleaved with the runs (same interpreter and environment): a bare `python -c pass`
and `python -c "import agent_runner.__main__"` (the runner's imports); the ratios show how much of
a start is the interpreter, the imports, and the runner's own work (task, price table, database).
Prints figures only, asserts no timing. The server, PostgreSQL, temporary files and any runner
process are stopped on errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from agent_runner.history import upgrade
from integration.llm_server import OPENAI_PATH, Recorded, Reply, ScriptedServer, openai_reply
from integration.postgres import running_postgres
from nocturne_operator.api import AgentScheduleSpec
from nocturne_operator.render import ScheduleRef, task_document

TIMEOUT = 120.0  # seconds one process may take before the bench gives up on it
API_KEY = "sk-bench-not-a-secret"


class FirstRequests:
    """The server side: answers every chat completion and notes when each request arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrivals: list[float] = []
        self._answer = openai_reply("Nothing changed since the previous run.")

    def __call__(self, request: Recorded) -> Reply:
        now = time.perf_counter()
        with self._lock:
            self.arrivals.append(now)
        return self._answer(request)

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def at(self, index: int) -> float | None:
        with self._lock:
            return self.arrivals[index] if index < len(self.arrivals) else None


def write_task(directory: Path, base_url: str) -> Path:
    """The task document for an OpenAI-compatible agent whose baseURL is the local server."""
    spec = AgentScheduleSpec.model_validate(
        {
            "schedule": "0 9 * * *",
            "task": {"query": "What changed on the watched pages since the previous run?"},
            "agent": {
                "model": "gpt-4o-mini",
                "provider": "openai",
                "baseURL": f"{base_url}/v1",
                "apiKeySecretRef": {"name": "llm", "key": "api-key"},
            },
            "budget": {"maxPerRunUSD": "0.50"},
            "timeoutSeconds": 120,
        }
    )
    ref = ScheduleRef("news", "bench", str(uuid.uuid4()))
    path = directory / "task.json"
    path.write_text(json.dumps(task_document(ref, spec)))
    return path


def job_env(directory: Path, task: Path, database_url: str) -> dict[str, str]:
    """What the Job gives the runner's container (a new Job and pod each time)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONSAFEPATH": "1",
        "NOCTURNE_TASK_FILE": str(task),
        "NOCTURNE_POD_NAME": "bench-1-abcde",
        "NOCTURNE_POD_UID": str(uuid.uuid4()),
        "NOCTURNE_JOB_NAME": "bench-1",
        "NOCTURNE_JOB_UID": str(uuid.uuid4()),
        "NOCTURNE_DATABASE_URL": database_url,
        "NOCTURNE_LLM_API_KEY": API_KEY,
        "NOCTURNE_TERMINATION_LOG": str(directory / "termination-log"),
    }


def run_process(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Start ``args``; its start time, exit time (``perf_counter``) and stderr. Raises if it
    fails or takes longer than ``TIMEOUT``; never leaves it running."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = proc.communicate(timeout=TIMEOUT)
        end = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(err.splitlines()[-20:])
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return start, end, err


def time_python(code: str, env: dict[str, str]) -> float:
    """Wall seconds of ``python -c code`` with the runner's interpreter and environment."""
    start, end, _ = run_process([sys.executable, "-c", code], env)
    return end - start


def time_runner(
    directory: Path, task: Path, database_url: str, model: FirstRequests
) -> tuple[float, float]:
    """Seconds from process start to the first model request, and to exit, of one run."""
    seen = model.count()
    start, end, err = run_process(
        [sys.executable, "-m", "agent_runner"], job_env(directory, task, database_url)
    )
    arrived = model.at(seen)
    if arrived is None:
        raise RuntimeError(f"the runner exited without calling the model:\n{err[-2000:]}")
    return arrived - start, end - start


def line(label: str, times: list[float], suffix: str = "") -> str:
    ms = [t * 1000 for t in times]
    return (
        f"{label:<52} median {statistics.median(ms):8.1f} ms  "
        f"(min {min(ms):7.1f}, max {max(ms):7.1f}){suffix}"
    )


def _stop(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP: unwind like an error, so the runner, server and PostgreSQL are stopped."""
    for name in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(name, signal.SIG_IGN)  # let the cleanup finish
    raise SystemExit(128 + signum)


def main(runs: int) -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    with ExitStack() as stack:
        postgres = stack.enter_context(running_postgres())
        upgrade(postgres.url)
        server = stack.enter_context(ScriptedServer())
        model = FirstRequests()
        server.route(OPENAI_PATH, model, method="POST")
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nocturne-bench-")))
        task = write_task(directory, server.url)
        base_env = job_env(directory, task, postgres.url)

        # Interleaved, so that a change in the machine's load affects all three alike.
        bare: list[float] = []
        imports: list[float] = []
        to_request: list[float] = []
        to_exit: list[float] = []
        for i in range(runs + 1):  # the first round warms caches and is not counted
            sample = (
                time_python("pass", base_env),
                time_python("import agent_runner.__main__", base_env),
                *time_runner(directory, task, postgres.url, model),
            )
            if i:
                for series, value in zip((bare, imports, to_request, to_exit), sample, strict=True):
                    series.append(value)

    bare_ms = statistics.median(bare)
    import_ms = statistics.median(imports)
    request_ms = statistics.median(to_request)
    print(f"runs: {runs} each, after one warm-up run; interpreter {sys.executable}")
    print(line("baseline  python -c pass", bare))
    print(
        line(
            "baseline  python -c 'import agent_runner.__main__'",
            imports,
            f"  ({import_ms / bare_ms:.1f}x python start)",
        )
    )
    print(
        line(
            "runner    process start -> first model request",
            to_request,
            f"  ({request_ms / bare_ms:.1f}x python start, {request_ms / import_ms:.2f}x import)",
        )
    )
    print(line("runner    process start -> exit", to_exit))


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    if count < 1:
        sys.exit("runs: must be at least 1")
    main(count)
