"""Measure the run API's latency under 200 concurrent runs reporting progress every 5 s.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/run_api_load.py [--duration 60]
     [--runs 200] [--schedules 20] [--interval 5] [--ramp 5] [--pool-size N]
Starts a private PostgreSQL migrated like the Helm hook does and the operator's real run API
(``make_app`` over TLS with its in-memory CA, real History and price table; only TokenReview is
replaced, by ``bench.runner_start.BenchTokens``), with 200 tokens mapped to 200 distinct Jobs of
20 schedules, so reservations contend for each schedule's lock as concurrent Jobs do.

The runners are the real ``RunApiClient`` (blocking httpx, its own TLS context, retries), one
thread each, all in one separate process so that the clients do not share the server's GIL.
Each run starts (a grant) at a random moment within ``--ramp`` seconds (0: all at once, as when
every schedule fires at 09:00 and the pods start together; then every progress report comes in
one burst of 200), reports progress every ``--interval`` seconds (cumulative cost growing within
its grant) for ``--duration`` seconds, then finishes. Latency is measured by the client around
each call (retries included).

Baseline, same run, same client process and load, measured first: a bare aiohttp TLS endpoint
served by the same ``serve()`` and TLS setup that answers every request with a fixed document
(an Ack; a fixed Grant for start). Printed: p50/p95/p99/max per endpoint, throughput, errors,
the ratios to the baseline, the server's own handling time (its Prometheus histogram), how late
its event loop wakes, slow calls per interval, the machine's load average (the phases run one
after the other), and how busy the History connection pool was (from its checkout and checkin
events). ``--pool-size`` swaps a larger pool into History.connect's engine (bench-only: the
product has no such option). Asserts no timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from aiohttp import web

from agent_runner.contract import (
    FINISH_PATH,
    PROGRESS_PATH,
    START_PATH,
    USD_QUANTUM,
    Ack,
    FinishReport,
    Grant,
    ProgressReport,
    RunRef,
    StartRequest,
    parse_task_document,
)
from agent_runner.runapi import RunApiClient
from nocturne_operator.adapters.metrics import REGISTRY
from nocturne_operator.prices import load_price_table
from nocturne_operator.render import ScheduleRef, task_document
from nocturne_operator.runapi.auth import RunIdentity
from nocturne_operator.storage import History

if TYPE_CHECKING:
    from bench.runner_start import RunApi, bench_history, bench_spec
else:  # a file next to this one, not a package: the repository's root would shadow `operator`
    sys.path.append(str(Path(__file__).parent))
    from runner_start import RunApi, bench_history, bench_spec

ENDPOINTS = ("start", "progress", "finish")
SLOW = 0.1  # seconds: a call slower than this is counted in the timeline
T = TypeVar("T")


# ---- the client side (runs in the child process) ------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One simulated runner: its token file, the run it reports on, when it starts."""

    token_file: str
    run: RunRef
    offset: float


@dataclass
class Samples:
    """What the clients saw: (endpoint, seconds since the phase began, seconds taken) per
    successful call, errors by kind."""

    latencies: list[tuple[str, float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0


def _timed(samples: Samples, endpoint: str, call: Callable[[], T]) -> T | None:
    at = time.monotonic()
    began = time.perf_counter()
    try:
        result = call()
    except Exception as exc:  # counted and shown, the run goes on as a runner's would
        kind = f"{endpoint}: {type(exc).__name__}"
        samples.errors[kind] += 1
        samples.examples.setdefault(kind, str(exc)[:300])
        return None
    samples.latencies.append((endpoint, at, time.perf_counter() - began))
    return result


def _one_run(
    plan: RunPlan,
    samples: Samples,
    *,
    url: str,
    ca_pem: str,
    began: float,
    duration: float,
    interval: float,
) -> None:
    time.sleep(max(0.0, began + plan.offset - time.monotonic()))
    with RunApiClient(url, ca_pem, Path(plan.token_file)) as client:
        started = time.monotonic()
        request = StartRequest(run=plan.run, started_at=datetime.now(UTC))
        grant = _timed(samples, "start", lambda: client.start(request))
        if grant is None:
            return
        reports = max(0, int((duration - 1e-9) // interval))
        cost = Decimal(0)
        for step in range(1, reports + 1):
            time.sleep(max(0.0, started + step * interval - time.monotonic()))
            # Cumulative and within the grant: the last report is at reports/(reports+1).
            cost = (grant.limit_usd * step / (reports + 1)).quantize(USD_QUANTUM, ROUND_DOWN)
            report = ProgressReport(
                run=plan.run,
                execution_id=grant.execution_id,
                cost_usd=cost,
                input_tokens=1500 * step,
                output_tokens=300 * step,
                steps=step,
                activity=f"step {step}: web_fetch",
            )
            _timed(samples, "progress", partial(client.progress, report))
        time.sleep(max(0.0, started + duration - time.monotonic()))
        final = FinishReport(
            run=plan.run,
            execution_id=grant.execution_id,
            status="SUCCEEDED",
            completed_at=datetime.now(UTC),
            cost_usd=cost,
            input_tokens=1500 * reports,
            output_tokens=300 * reports,
            output="Nothing changed since the previous run.",
        )
        _timed(samples, "finish", lambda: client.finish(final))


def drive(url: str, ca_pem: str, plans: list[RunPlan], duration: float, interval: float) -> Samples:
    """Run every plan on its own thread against ``url``; what the clients measured."""
    samples = Samples()
    began = time.monotonic() + 0.5  # every thread is up before the first start
    threads = [
        threading.Thread(
            target=_one_run,
            args=(plan, samples),
            kwargs={
                "url": url,
                "ca_pem": ca_pem,
                "began": began,
                "duration": duration,
                "interval": interval,
            },
        )
        for plan in plans
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples.wall = time.monotonic() - began
    samples.latencies = [(name, at - began, took) for name, at, took in samples.latencies]
    return samples


# ---- the server side ----------------------------------------------------------------------


def bare_app() -> web.Application:
    """The baseline: reads the body, answers a fixed document; no auth, parsing or database."""
    grant = Grant(
        execution_id=1,
        attempt=0,
        limit_usd=Decimal("0.50"),
        price=load_price_table().lookup("openai", "gpt-4o-mini"),
    ).model_dump_json()
    ack = Ack().model_dump_json()

    def fixed(text: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text=text, content_type="application/json")

        return handler

    app = web.Application()
    app.router.add_post(START_PATH, fixed(grant))
    app.router.add_post(PROGRESS_PATH, fixed(ack))
    app.router.add_post(FINISH_PATH, fixed(ack))
    return app


def make_runs(
    api: RunApi, directory: Path, runs: int, schedules: int, ramp: float
) -> list[RunPlan]:
    """``runs`` Jobs spread over ``schedules`` schedules, a token registered for each."""
    spec = bench_spec(
        # The total and monthly caps make every reservation sum the schedule's spend.
        budget={"maxPerRunUSD": "0.50", "maxTotalUSD": "500.00", "maxMonthlyUSD": "200.00"},
        timeoutSeconds=600,
    )
    refs = [
        ScheduleRef(f"agent-{i:02d}", f"team-{i % 4}", str(uuid.uuid4())) for i in range(schedules)
    ]
    tasks = [parse_task_document(json.dumps(task_document(ref, spec))) for ref in refs]
    plans = []
    for n in range(runs):
        ref, task = refs[n % schedules], tasks[n % schedules]
        job_name, job_uid, pod_uid = f"{ref.name}-{n}", str(uuid.uuid4()), str(uuid.uuid4())
        token = f"bench-{uuid.uuid4().hex}"
        token_file = directory / f"token-{n}"
        token_file.write_text(token)
        api.tokens.register(
            token,
            RunIdentity(
                namespace=ref.namespace,
                schedule=ref.name,
                schedule_uid=ref.uid,
                job_name=job_name,
                job_uid=job_uid,
                pod_name=f"{job_name}-abcde",
                pod_uid=pod_uid,
                task=task,
            ),
        )
        run = RunRef(
            namespace=ref.namespace,
            schedule=ref.name,
            schedule_uid=ref.uid,
            job_uid=job_uid,
            pod_uid=pod_uid,
        )
        plans.append(RunPlan(str(token_file), run, random.uniform(0, ramp)))  # noqa: S311
    return plans


def history_pool(history: History, size: int | None) -> sa.QueuePool:
    """The History engine's pool; with ``size``, first replaced by a QueuePool of ``size`` +
    ``size`` overflow. Bench-only: History.connect fixes its pool at 2 + 2 and has no option;
    the engine (URL, connect arguments, timeouts, dialect) stays History.connect's own."""
    pool = history.engine.pool
    if size is not None:
        pool = sa.QueuePool(
            pool._creator,  # the engine's own connect function
            pool_size=size,
            max_overflow=size,
            pre_ping=True,
            dialect=pool._dialect,
        )
        history.engine.pool = pool
    assert isinstance(pool, sa.QueuePool)  # noqa: S101 - what History.connect makes
    return pool


class PoolUse:
    """How long (seconds) each number of History connections was checked out, from the pool's
    checkout and checkin events (exact, and no polling thread competing for the GIL)."""

    def __init__(self, pool: sa.QueuePool) -> None:
        self.capacity = pool.size() + pool._max_overflow  # no public getter
        self.seconds: defaultdict[int, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._out = 0
        self._since = time.perf_counter()
        sa.event.listen(pool, "checkout", lambda *_: self._change(+1))
        sa.event.listen(pool, "checkin", lambda *_: self._change(-1))

    def _change(self, delta: int) -> None:
        with self._lock:
            now = time.perf_counter()
            self.seconds[self._out] += now - self._since
            self._out, self._since = self._out + delta, now

    def reset(self) -> None:
        """Start counting from now."""
        with self._lock:
            self.seconds.clear()
            self._since = time.perf_counter()

    def summary(self) -> str:
        with self._lock:
            seconds = defaultdict(float, self.seconds)
            seconds[self._out] += time.perf_counter() - self._since
        total = sum(seconds.values()) or 1.0
        mean = sum(k * v for k, v in seconds.items()) / total
        full = sum(v for k, v in seconds.items() if k >= self.capacity) / total
        busiest = max((k for k, v in seconds.items() if v > 0), default=0)
        return (
            f"checked out: mean {mean:.2f}, max {busiest}; all {self.capacity} in use "
            f"{full:.1%} of the {total:.0f} s"
        )


async def loop_lag(done: threading.Event, lags: list[float], period: float = 0.02) -> None:
    """On the server's loop: how late each ``period`` sleep wakes (a loop busy with handlers or
    waiting for the GIL answers late)."""
    while not done.is_set():
        began = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - began - period)


def server_seconds() -> dict[str, tuple[float, float]]:
    """The run API's own histogram: (count, sum of seconds) per endpoint so far."""
    name = "nocturne_run_api_request_duration_seconds"
    figures = {}
    for endpoint in ENDPOINTS:
        labels = {"endpoint": endpoint}
        count = REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0
        total = REGISTRY.get_sample_value(f"{name}_sum", labels) or 0.0
        figures[endpoint] = (count, total)
    return figures


# ---- report -------------------------------------------------------------------------------


def percentiles(values: list[float]) -> tuple[float, float, float, float]:
    """p50, p95, p99 and max, in milliseconds."""
    ms = sorted(v * 1000 for v in values)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0], ms[0]
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98], ms[-1]


def by_endpoint(samples: Samples) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = {endpoint: [] for endpoint in ENDPOINTS}
    for endpoint, _at, seconds in samples.latencies:
        grouped[endpoint].append(seconds)
    return grouped


def report(label: str, samples: Samples, baseline: dict[str, list[float]] | None = None) -> None:
    grouped = by_endpoint(samples)
    for endpoint in ENDPOINTS:
        values = grouped[endpoint]
        errors = sum(n for kind, n in samples.errors.items() if kind.startswith(endpoint + ":"))
        if not values:
            print(f"  {label:<8} {endpoint:<8} no successful call, {errors} errors")
            continue
        p50, p95, p99, top = percentiles(values)
        ratio = ""
        if baseline and baseline[endpoint]:
            b50, _b95, b99, _bmax = percentiles(baseline[endpoint])
            ratio = f"  ({p50 / b50:5.1f}x / {p99 / b99:5.1f}x baseline p50 / p99)"
        print(
            f"  {label:<8} {endpoint:<8} n {len(values):5d}  p50 {p50:7.1f}  p95 {p95:7.1f}  "
            f"p99 {p99:7.1f}  max {top:7.1f} ms  errors {errors}{ratio}"
        )
    total = len(samples.latencies)
    print(
        f"  {label:<8} throughput {total / samples.wall:6.1f} requests/s "
        f"({total} answered in {samples.wall:.1f} s), errors {sum(samples.errors.values())}"
    )
    for kind, count in sorted(samples.errors.items()):
        print(f"    {count} x {kind}: {samples.examples[kind]}")


def main(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        history = bench_history(stack)
        pool = history_pool(history, args.pool_size)
        use = PoolUse(pool)
        api = stack.enter_context(RunApi(history))
        baseline_api = RunApi(history)
        baseline_api.app = bare_app()  # the same serve() and TLS setup, a bare app
        stack.enter_context(baseline_api)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nocturne-load-")))
        plans = make_runs(api, directory, args.runs, args.schedules, args.ramp)
        workers = stack.enter_context(multiprocessing.get_context("spawn").Pool(1))

        phase = (args.duration, args.interval)
        base = workers.apply(drive, (baseline_api.url, baseline_api.tls.ca_pem, plans, *phase))
        base_load = os.getloadavg()[0]
        before = server_seconds()
        use.reset()
        done, lags = threading.Event(), list[float]()
        probe = asyncio.run_coroutine_threadsafe(loop_lag(done, lags), api.loop)
        real = workers.apply(drive, (api.url, api.tls.ca_pem, plans, *phase))
        done.set()
        probe.result(timeout=10)
        real_load = os.getloadavg()[0]
        pool_use = use.summary()
        after = server_seconds()

    reports = int((args.duration - 1e-9) // args.interval)
    print(
        f"run API load: {args.runs} runs ({args.schedules} schedules), each start -> progress "
        f"every {args.interval:g} s x {reports} -> finish after {args.duration:g} s, "
        f"starts spread over {args.ramp:g} s"
    )
    print(
        "clients: agent_runner.runapi.RunApiClient (blocking httpx), one thread per run, in one "
        f"separate process; machine: {os.cpu_count()} CPUs, PostgreSQL on the same machine"
    )
    print(
        f"machine load (1-min average at each phase's end; {os.cpu_count()} CPUs): "
        f"baseline {base_load:.2f}, run API {real_load:.2f}"
    )
    print("latency seen by the client (TLS, retries included):")
    report("baseline", base)
    report("run API", real, by_endpoint(base))
    print("run API handling time (its own histogram; from request to response):")
    for endpoint in ENDPOINTS:
        count = after[endpoint][0] - before[endpoint][0]
        seconds = after[endpoint][1] - before[endpoint][1]
        if count:
            print(f"  {endpoint:<8} mean {seconds / count * 1000:7.1f} ms over {count:.0f}")
    lag = percentiles(lags)
    print(
        f"  server loop lag (a 20 ms sleep wakes late by): p50 {lag[0]:.1f}  p99 {lag[2]:.1f}  "
        f"max {lag[3]:.1f} ms"
    )
    slow = Counter(int(at // args.interval) for _e, at, took in real.latencies if took > SLOW)
    windows = int(real.wall // args.interval) + 1
    print(
        f"run API calls over {SLOW * 1000:.0f} ms per {args.interval:g}-s window: "
        + " ".join(str(slow[w]) for w in range(windows))
    )
    label = "History.connect's" if args.pool_size is None else "--pool-size"
    print(
        f"History pool ({label}): QueuePool {pool.size()} + {use.capacity - pool.size()} "
        f"overflow = {use.capacity} connections; during the run API phase {pool_use}; "
        f"the server's to_thread executor: {min(32, (os.cpu_count() or 1) + 4)} threads"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="concurrent runs (default 200)")
    parser.add_argument("--schedules", type=int, default=20, help="their schedules (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per run (60)")
    parser.add_argument("--interval", type=float, default=5.0, help="progress every (5 s)")
    parser.add_argument("--ramp", type=float, default=5.0, help="starts spread over (5 s)")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="bench only: History pool size N + N overflow instead of History.connect's 2 + 2",
    )
    args = parser.parse_args()
    if args.runs < 1 or args.schedules < 1 or args.interval <= 0 or args.duration <= 0:
        parser.error("--runs and --schedules must be at least 1, --interval and --duration > 0")
    if args.ramp < 0 or (args.pool_size is not None and args.pool_size < 1):
        parser.error("--ramp must be >= 0 and --pool-size at least 1")
    return args


if __name__ == "__main__":
    main(parse_args())
