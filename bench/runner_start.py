"""Measure the runner's start: process start -> first model request, and -> process exit.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/runner_start.py [runs]
Starts the operator's real run API (``nocturne_operator.runapi.server.make_app`` over TLS with its
own CA, budgets reserved in a private PostgreSQL migrated like the Helm hook does; only the
TokenReview is replaced by a table of the bench's tokens) and a local OpenAI-compatible server,
then runs `python -m agent_runner` `runs` times (default 5, after one unmeasured warm-up round)
with the environment a Job's pod gets: the task snapshot, the run API's URL and CA, a token file.
The first model request is timed by the server when it arrives, on the same clock as the process
start. So a start includes the real client path: TLS handshake, start -> grant (a reservation in
PostgreSQL under the schedule's lock), the progress report that announces the call's
reservation, then the first model call.
Baselines, interleaved with the runs (same interpreter and environment): a bare `python -c pass`,
`python -c "import agent_runner.__main__"` (the runner's imports), and the same plus what the
runner imported before issue 10 (SQLAlchemy with its ORM and PostgreSQL dialect, psycopg, PyYAML
for the price table). Then one `python -X importtime` breaks the imports down by package.
Prints figures only, asserts no timing. The servers, PostgreSQL, temporary files and any runner
process are stopped on errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from agent_runner.contract import parse_task_document
from harness.postgres import running_postgres
from integration.llm_server import (
    OPENAI_PATH,
    Recorded,
    Reply,
    ScriptedServer,
    free_port,
    openai_reply,
)
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.prices import load_price_table
from nocturne_operator.render import ScheduleRef, task_document
from nocturne_operator.runapi.auth import RefusalError, RunIdentity
from nocturne_operator.runapi.server import make_app, serve
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History, upgrade

TIMEOUT = 120.0  # seconds one process may take before the bench gives up on it
API_KEY = "sk-bench-not-a-secret"
RECORDED_BEFORE_MS = 735.0  # process start -> first model request, runner with PostgreSQL
OLD_IMPORTS = "sqlalchemy, sqlalchemy.orm, sqlalchemy.dialects.postgresql, psycopg, yaml"


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


class BenchTokens:
    """The authenticator: the bench's tokens -> their runs (the apiserver's TokenReview and the
    pod -> Job lookup are what a cluster adds; everything after them is the real server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, RunIdentity] = {}

    def register(self, token: str, identity: RunIdentity) -> None:
        with self._lock:
            self._runs[token] = identity

    async def identify(self, token: str) -> RunIdentity:
        with self._lock:
            identity = self._runs.get(token)
        if identity is None:
            raise RefusalError(401, "Unauthenticated", "not a bench token")
        return identity


class RunApi:
    """The operator's run API on its own event loop in a thread (context manager)."""

    def __init__(self, history: History) -> None:
        self.tokens = BenchTokens()
        self.port = free_port()
        self.settings = Settings(
            run_api_port=self.port,
            run_api_bind="127.0.0.1",
            run_api_url=f"https://127.0.0.1:{self.port}",
            run_api_hostnames=["127.0.0.1"],
        )
        self.tls = RunApiTls.create(["127.0.0.1"])
        self.app = make_app(
            authenticator=self.tokens,
            history=history,
            prices=load_price_table(),
            settings=self.settings,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=30)

    def __enter__(self) -> RunApi:
        self.thread.start()
        self.runner = self._run(serve(self.app, self.settings, self.tls))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def bench_spec(base_url: str | None = None, **fields: Any) -> AgentScheduleSpec:
    """The benches' schedule spec: an OpenAI-compatible agent (served at ``base_url`` when
    given); ``fields`` replace top-level fields of the spec."""
    agent = {
        "model": "gpt-4o-mini",
        "provider": "openai",
        "apiKeySecretRef": {"name": "llm", "key": "api-key"},
    }
    if base_url is not None:
        agent["baseURL"] = f"{base_url}/v1"
    return AgentScheduleSpec.model_validate(
        {
            "schedule": "0 9 * * *",
            "task": {"query": "What changed on the watched pages since the previous run?"},
            "agent": agent,
            "budget": {"maxPerRunUSD": "0.50"},
            "timeoutSeconds": 120,
            **fields,
        }
    )


def make_task(base_url: str) -> tuple[str, ScheduleRef]:
    """The task document for an OpenAI-compatible agent whose baseURL is the local server."""
    ref = ScheduleRef("news", "bench", str(uuid.uuid4()))
    return json.dumps(task_document(ref, bench_spec(base_url))), ref


def job_env(directory: Path, task: str, api: RunApi, ref: ScheduleRef) -> dict[str, str]:
    """What the Job gives the runner's container (a new Job, pod and token each time), with the
    token registered for that pod."""
    job, pod = str(uuid.uuid4()), str(uuid.uuid4())
    token = f"bench-{uuid.uuid4().hex}"
    token_file = directory / "token"
    token_file.write_text(token)
    api.tokens.register(
        token,
        RunIdentity(
            namespace=ref.namespace,
            schedule=ref.name,
            schedule_uid=ref.uid,
            job_name="news-1",
            job_uid=job,
            pod_name="news-1-abcde",
            pod_uid=pod,
            task=parse_task_document(task),
        ),
    )
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONSAFEPATH": "1",
        "NOCTURNE_TASK": task,
        "NOCTURNE_POD_NAME": "news-1-abcde",
        "NOCTURNE_POD_UID": pod,
        "NOCTURNE_JOB_NAME": "news-1",
        "NOCTURNE_JOB_UID": job,
        "NOCTURNE_RUN_API_URL": api.url,
        "NOCTURNE_RUN_API_CA": api.tls.ca_pem,
        "NOCTURNE_RUN_API_TOKEN_FILE": str(token_file),
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
    directory: Path, task: str, ref: ScheduleRef, api: RunApi, model: FirstRequests
) -> tuple[float, float]:
    """Seconds from process start to the first model request, and to exit, of one run."""
    seen = model.count()
    start, end, err = run_process(
        [sys.executable, "-m", "agent_runner"], job_env(directory, task, api, ref)
    )
    arrived = model.at(seen)
    if arrived is None:
        raise RuntimeError(f"the runner exited without calling the model:\n{err[-2000:]}")
    return arrived - start, end - start


_MEASURED = ("agent_runner", *(name.split(".")[0] for name in OLD_IMPORTS.split(", ")))
_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$")


def import_breakdown(env: dict[str, str]) -> dict[str, float]:
    """Milliseconds (cumulative, ``-X importtime``) per top-level package of one interpreter
    importing the runner, then what the old runner imported besides: each package counts only
    what was not loaded before it."""
    code = f"import agent_runner.__main__; import {OLD_IMPORTS}"
    _start, _end, err = run_process([sys.executable, "-X", "importtime", "-c", code], env)
    totals: dict[str, float] = defaultdict(float)
    for text in err.splitlines():
        match = _IMPORTTIME.match(text)
        if match and not match.group(3):  # depth 0: imported by the -c code (or by site)
            package = match.group(4).split(".")[0]
            if package in _MEASURED:
                totals[package] += int(match.group(2)) / 1000
    return dict(totals)


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


def bench_history(stack: ExitStack) -> History:
    """History on a migrated PostgreSQL of the bench's own, closed and stopped with ``stack``;
    SIGTERM and SIGHUP unwind ``stack`` too."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    postgres = stack.enter_context(running_postgres())
    upgrade(postgres.url)
    return stack.enter_context(History.connect(postgres.url))


def main(runs: int) -> None:
    with ExitStack() as stack:
        history = bench_history(stack)
        api = stack.enter_context(RunApi(history))
        server = stack.enter_context(ScriptedServer())
        model = FirstRequests()
        server.route(OPENAI_PATH, model, method="POST")
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nocturne-bench-")))
        task, ref = make_task(server.url)
        base_env = job_env(directory, task, api, ref)

        # Interleaved, so that a change in the machine's load affects all alike.
        bare: list[float] = []
        imports: list[float] = []
        old_imports: list[float] = []
        to_request: list[float] = []
        to_exit: list[float] = []
        for i in range(runs + 1):  # the first round warms caches and is not counted
            sample = (
                time_python("pass", base_env),
                time_python("import agent_runner.__main__", base_env),
                time_python(f"import agent_runner.__main__; import {OLD_IMPORTS}", base_env),
                *time_runner(directory, task, ref, api, model),
            )
            if i:
                series = (bare, imports, old_imports, to_request, to_exit)
                for values, value in zip(series, sample, strict=True):
                    values.append(value)
        breakdown = import_breakdown(base_env)

    bare_ms = statistics.median(bare) * 1000
    import_ms = statistics.median(imports) * 1000
    old_ms = statistics.median(old_imports) * 1000
    request_ms = statistics.median(to_request) * 1000
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
            "before    ... + SQLAlchemy, psycopg, PyYAML",
            old_imports,
            f"  (+{old_ms - import_ms:.1f} ms no longer imported)",
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
    print(
        f"{'before    start -> first request (old notes)':<52} "
        f"median {RECORDED_BEFORE_MS:8.1f} ms  (runner with PostgreSQL; now "
        f"{request_ms - RECORDED_BEFORE_MS:+.1f} ms, other machine and load)"
    )
    print("-X importtime, cumulative ms by package (each counts only what was new to it):")
    for name, ms in sorted(breakdown.items(), key=lambda item: -item[1]):
        if ms >= 1:
            print(f"  {name:<20} {ms:8.1f} ms")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    if count < 1:
        sys.exit("runs: must be at least 1")
    main(count)
