"""Measure one operator with N AgentSchedules, side by side with the bare client (issue 13).

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/operator_scale.py [--n 1000]
     [--namespaces 25] [--idle-n 50] [--burst 200] [--idle-seconds 300] [--clients 8]
     [--json PATH]
Starts its own control plane (harness.controlplane), a private PostgreSQL migrated like the Helm
hook does, and ``python -m nocturne_operator`` as a subprocess with default settings (offline
provider, no node: schedules are created, never run; each fires once a day, 12 hours
from now, so no Job is created while the bench runs).

One client (httpx, ``--clients`` threads, server-side apply with the admin certificate) does
everything: the baseline applies the CronJob ``render_cronjob`` renders for each schedule (its
ownerReference dropped: it would name a schedule that does not exist and the garbage collector
would delete it) into namespaces the operator does not watch; then the same client applies the N
AgentSchedules. Two watches (schedules; our CronJobs, metadata only) time when each CronJob
appears and each schedule turns Ready for its generation, without polling the apiserver.

Figures (the issue's ids):
  G1  create N -> every CronJob exists and every schedule is Ready: time, ratio to the baseline,
      create -> Ready p50/p99;
  G2  apiserver writes per schedule (apiserver_request_total deltas from the apiserver's own
      /metrics, by verb and resource, the bench's own applies subtracted), and the operator's
      nocturne_status_writes_total;
  G4  the operator's RSS (VmRSS of its process tree) at 0, at N (right after creating), and after
      the idle phase (with --trace-memory, what it holds live at each);
  G11 idle CPU of the operator and the apiserver over --idle-seconds (utime+stime from /proc),
      and the apiserver's GET/LIST requests meanwhile (watches excluded);
  G5  SIGKILL the operator at N and start it again (see RESTART_DEFINITION);
  G3  --idle-n schedules created one second apart (create -> CronJob p50/p99), then a burst of
      --burst at once (p99);
  R   the run API under load, last: --runs Jobs of --run-schedules schedules (their CronJob's
      template, pods made by the Job controller, never run: the control plane has no node),
      each with a token the apiserver issues bound to its pod (TokenRequest, the runner's
      audience), report through the operator's run API as runners do: start (a grant),
      progress every --run-interval s, finish after --run-seconds. The clients are
      bench/run_api_load.py's (the real RunApiClient, a thread per run, in a child process),
      first against its bare endpoint (a fixed answer, no auth, no database: the baseline),
      then against the operator. Printed: p50/p99 per call, errors, the operator's and the
      apiserver's CPU meanwhile.
G4, G5 and G11 are taken at exactly N schedules; G3's schedules come after them, the runs last.
Prints the table, the raw numbers and the machine's load average after each phase. Asserts no
timing.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import multiprocessing
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import yaml

from agent_runner.contract import TOKEN_AUDIENCE, RunRef
from harness import controlplane
from harness.kube import healthy, wait_for
from harness.postgres import running_postgres
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.render import RunApiEndpoint, ScheduleRef, cronjob_name, render_cronjob
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History, upgrade

if TYPE_CHECKING:
    from bench.run_api_load import RunPlan, Samples, bare_app, by_endpoint, drive, percentiles
    from bench.runner_start import RunApi
else:  # files next to this one, not a package: the repository's root would shadow `operator`
    sys.path.append(str(Path(__file__).parent))
    from run_api_load import RunPlan, Samples, bare_app, by_endpoint, drive, percentiles
    from runner_start import RunApi

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "nocturne.dev", "v1alpha1", "agentschedules"
FIELD_MANAGER = "nocturne-bench"
MANAGED = "app.kubernetes.io/managed-by=nocturne-operator"
RUNNER_IMAGE = "nocturne-runner:bench"
TLS_NAMESPACE = "default"
ZONE = "Europe/Berlin"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"})
READ_VERBS = frozenset({"GET", "LIST"})
# What the operator writes; anything else on the apiserver's counters (its own leases, the
# controller-manager's objects) is background and listed apart.
OPERATOR_RESOURCES = frozenset(
    {"agentschedules", "cronjobs", "jobs", "pods", "events", "configmaps", "secrets"}
)
RECONCILES = "nocturne_reconcile_duration_seconds_count"
STATUS_WRITES = "nocturne_status_writes_total"
DEFAULT_QUOTA = Settings.model_fields["max_schedules_per_namespace"].default
QUIET = 5.0  # seconds without a change that count as settled
# The operator logs it once every schedule kopf listed at its start had a pass.
FIRST_PASS = "first pass done"  # noqa: S105 - a log line, not a password
RESTART_DEFINITION = (
    "back in step = from the SIGKILL until both: the new process has reconciled every schedule "
    f"it listed at its start (its log's '{FIRST_PASS}') and a probe schedule, created when its "
    "liveness endpoint answers (startup handlers done), is Ready; writes are counted until then"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
T = TypeVar("T")


# ---- the client ---------------------------------------------------------------------------


class Api:
    """The bench's one client: httpx over TLS with the admin client certificate."""

    def __init__(self, cp: controlplane.ControlPlane, clients: int) -> None:
        self.cp = cp
        self.http = self.connect(clients)

    def connect(self, connections: int) -> httpx.Client:
        """An httpx client of the apiserver with up to ``connections`` connections."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(
            base_url=self.cp.server,
            verify=controlplane.ssl_context(self.cp.pki),
            limits=limits,
            timeout=httpx.Timeout(60.0),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a kept-alive connection the apiserver closed meanwhile is retried on a
        new one (every request here is idempotent: applies, GETs)."""
        for attempt in range(3):
            try:
                return self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def apply(self, path: str, obj: Mapping[str, Any]) -> None:
        """Server-side apply ``obj`` at ``path`` (the object's own URL) as the bench."""
        resp = self.request(
            "PATCH",
            path,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )
        if resp.status_code >= 300:
            raise RuntimeError(f"apply {path}: {resp.status_code} {resp.text[:500]}")

    def get(self, path: str, **params: str) -> Any:
        """GET ``path`` as JSON."""
        resp = self.request("GET", path, params=params)
        resp.raise_for_status()
        return resp.json()

    def metrics(self) -> str:
        """The apiserver's own /metrics (system:masters may read it)."""
        resp = self.request("GET", "/metrics")
        resp.raise_for_status()
        return resp.text


def schedule_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def cronjob_path(namespace: str, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/cronjobs/{name}"


Key = tuple[str, str]  # (namespace, name)


# ---- watching what the operator does ------------------------------------------------------


@dataclass
class Tracker:
    """When each CronJob of ours first appeared and each schedule first turned Ready for its
    current generation (monotonic clock), from two watches run on threads."""

    api: Api
    cronjob_seen: dict[Key, float] = field(default_factory=dict)
    ready_at: dict[Key, float] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    last_error: str = ""
    streams: set[httpx.Response] = field(default_factory=set)

    def start(self) -> None:
        watches: list[tuple[str, dict[str, str], bool, Callable[[dict[str, Any]], None]]] = [
            (f"/apis/{GROUP}/{VERSION}/{PLURAL}", {}, False, self._schedule),
            ("/apis/batch/v1/cronjobs", {"labelSelector": MANAGED}, True, self._cronjob),
        ]
        ready = [threading.Event() for _ in watches]
        for (path, params, metadata_only, handle), listed in zip(watches, ready, strict=True):
            threading.Thread(
                target=self._watch,
                args=(path, params, metadata_only, handle, listed),
                daemon=True,
            ).start()
        for listed in ready:
            if not listed.wait(30):
                raise RuntimeError(f"the bench's watches did not start: {self.last_error}")

    def stop(self) -> None:
        """End the watches now: an open watch keeps the apiserver from stopping quickly."""
        self.stopping.set()
        # Closing a response from another thread leaves its socket open (and the apiserver,
        # when stopped, waits for the watch); shutting the socket down ends the read at once.
        for stream in list(self.streams):
            with suppress(Exception):
                stream.extensions["network_stream"].get_extra_info("socket").shutdown(
                    socket.SHUT_RDWR
                )

    def _cronjob(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.cronjob_seen.setdefault((meta["namespace"], meta["name"]), time.monotonic())

    def _schedule(self, obj: dict[str, Any]) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if conds.get("Ready") == "True" and status.get("observedGeneration") == meta.get(
            "generation"
        ):
            self.ready_at.setdefault((meta["namespace"], meta["name"]), time.monotonic())

    def _watch(
        self,
        path: str,
        params: dict[str, str],
        metadata_only: bool,
        handle: Callable[[dict[str, Any]], None],
        listed: threading.Event,
    ) -> None:
        """List, then watch from the list's version; list again after a 410 or an error."""
        # Only metadata for CronJobs: the bench needs their existence, not their specs.
        meta = "application/json;as=PartialObjectMetadata{};g=meta.k8s.io;v=v1"
        list_headers = {"Accept": meta.format("List")} if metadata_only else {}
        watch_headers = {"Accept": meta.format("")} if metadata_only else {}
        http = self.api.http
        version: str | None = None
        while not self.stopping.is_set():
            try:
                if version is None:
                    resp = http.get(path, params=params, headers=list_headers)
                    resp.raise_for_status()
                    listing = resp.json()
                    for item in listing.get("items") or []:
                        handle(item)
                    version = listing["metadata"]["resourceVersion"]
                    listed.set()
                query = {**params, "watch": "true", "resourceVersion": version}
                query["timeoutSeconds"] = "60"
                with http.stream(
                    "GET", path, params=query, headers=watch_headers, timeout=httpx.Timeout(90.0)
                ) as resp:
                    self.streams.add(resp)
                    if self.stopping.is_set():
                        break
                    for line in resp.iter_lines():
                        if not line:
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410 Gone: list again
                            version = None
                            break
                        version = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            handle(event["object"])
                    self.streams.discard(resp)
            except Exception:  # the apiserver or the client closing: retry unless stopping
                if self.stopping.is_set():
                    return
                self.last_error = f"{path}: {traceback.format_exc(limit=2)}"
                version = None
                time.sleep(0.5)

    def wait(self, keys: Iterable[Key], *, ready: bool, timeout: float, what: str) -> float:
        """Block until every key has its CronJob (and, with ``ready``, is Ready); the
        monotonic time when the last of them did."""
        wanted = list(keys)
        deadline = time.monotonic() + timeout
        while True:
            missing = [k for k in wanted if k not in self.cronjob_seen]
            if ready:
                missing += [k for k in wanted if k not in self.ready_at]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: {len(set(missing))} of {len(wanted)} not done after {timeout:.0f} s"
                    f" (e.g. {sorted(set(missing))[:3]})"
                )
            time.sleep(0.05)
        return max(max(self.cronjob_seen[k], self.ready_at[k] if ready else 0.0) for k in wanted)


# ---- metrics ------------------------------------------------------------------------------

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Requests = Counter[tuple[str, str]]  # (verb, resource[.group][/subresource]) -> requests


def apiserver_requests(api: Api) -> Requests:
    """apiserver_request_total summed over codes and scopes, per verb and resource;
    non-resource URLs (/metrics, /readyz) are left out."""
    counts: Requests = Counter()
    for line in api.metrics().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_part, value = line.rsplit(" ", 1)
        labels = dict(_LABEL.findall(labels_part))
        resource = labels.get("resource", "")
        if not resource:
            continue
        name = resource + (f".{labels['group']}" if labels.get("group") else "")
        if labels.get("subresource"):
            name += f"/{labels['subresource']}"
        counts[(labels.get("verb", ""), name)] += int(float(value))
    return counts


def delta(after: Requests, before: Requests, verbs: frozenset[str]) -> Requests:
    """The requests of ``verbs`` between two scrapes."""
    return Counter(
        {k: n - before.get(k, 0) for k, n in after.items() if k[0] in verbs and n > before[k]}
    )


def ours(requests: Requests) -> Requests:
    """Only the resources the operator writes."""
    return Counter(
        {
            k: n
            for k, n in requests.items()
            if k[1].split(".")[0].split("/")[0] in OPERATOR_RESOURCES
        }
    )


def operator_metric(url: str, name: str) -> float:
    """One unlabelled sample from the operator's /metrics (0 when absent or unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            text: str = resp.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def operator_requests(url: str) -> Counter[str]:
    """The operator's own Kubernetes API requests so far, by "VERB resource" (its
    nocturne_kube_requests_total; kopf's watches are not counted there)."""
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        text: str = resp.read().decode()
    found: Counter[str] = Counter()
    for match in re.finditer(
        r"^nocturne_kube_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", text, re.M
    ):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        found[f"{labels['verb']} {labels['resource']}"] += int(float(match["value"]))
    return found


# ---- processes ----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (from /proc/<pid>/stat's parent field)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and its children, in MiB."""
    total = 0
    for member in process_tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children, in seconds."""
    ticks = 0
    for member in process_tree(pid):
        with suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def load_average() -> float:
    return os.getloadavg()[0]


def logged_at(log: Path, offset: int, text_in_line: str) -> list[float]:
    """Wall-clock times (epoch seconds) of the log's lines with ``text_in_line`` written after
    ``offset``."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    local = datetime.now(UTC).astimezone().tzinfo  # kopf's asctime is local time
    times = []
    for line in text.splitlines():
        if text_in_line in line and line.startswith("["):
            stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=local)
            times.append(stamp.timestamp())
    return times


# ---- the operator -------------------------------------------------------------------------


@dataclass
class Operator:
    """``python -m nocturne_operator`` as tests/e2e/conftest.py starts it, on fixed ports so
    that a restart serves where its predecessor did."""

    cp: controlplane.ControlPlane
    database_url: str
    watch: str
    log: Path
    health_port: int
    metrics_port: int
    run_api_port: int
    max_per_namespace: int
    trace_memory: Path | None = None  # a directory for traced_operator.py's dumps
    process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101 - started before it is measured
        return self.process.pid

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.cp.kubeconfig),
            "PYTHONSAFEPATH": "1",
            "NOCTURNE_DATABASE_URL": self.database_url,
            "NOCTURNE_HEALTH_ENDPOINT": f"http://127.0.0.1:{self.health_port}/healthz",
            "NOCTURNE_RUNNER_IMAGE": RUNNER_IMAGE,
            "NOCTURNE_WATCH_NAMESPACES": self.watch,
            "NOCTURNE_METRICS_PORT": str(self.metrics_port),
            "NOCTURNE_RUN_API_PORT": str(self.run_api_port),
            "NOCTURNE_RUN_API_BIND": "127.0.0.1",
            "NOCTURNE_RUN_API_URL": self.run_api_url,
            "NOCTURNE_RUN_API_TLS_NAMESPACE": TLS_NAMESPACE,
            # A Lease per process: a restart after SIGKILL measures getting back in step, not
            # the predecessor's Lease running out (in a pod, a restarted container is PID 1
            # again and takes its own Lease back at once).
            "NOCTURNE_LEADER_LEASE_NAME": f"nocturne-bench-{os.getpid()}-{time.monotonic_ns()}",
            # Only when more schedules share a namespace than the default quota allows.
            **(
                {"NOCTURNE_MAX_SCHEDULES_PER_NAMESPACE": str(self.max_per_namespace)}
                if self.max_per_namespace > DEFAULT_QUOTA
                else {}
            ),
        }

    @property
    def run_api_url(self) -> str:
        return f"https://127.0.0.1:{self.run_api_port}"

    def spawn(self) -> None:
        """Start the process (no wait); under tracemalloc with ``trace_memory``."""
        command = [sys.executable, "-m", "nocturne_operator"]
        env = self.env()
        if self.trace_memory is not None:
            command = [sys.executable, str(REPO / "bench" / "traced_operator.py")]
            env["NOCTURNE_TRACE_MEMORY_DIR"] = str(self.trace_memory)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd="/",
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = 120) -> None:
        """Until kopf's liveness endpoint answers (its startup handlers have run)."""
        process = self.process
        assert process is not None  # noqa: S101
        wait_for(
            lambda: process.poll() is not None or healthy(self.health_port),
            timeout,
            "the operator's health endpoint",
            interval=0.05,
        )
        if process.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"operator exited with {process.returncode}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the process group, as an OOM kill or a node loss would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (kopf's graceful shutdown), SIGKILL after 30 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


# ---- what is created ----------------------------------------------------------------------


def schedule_spec(index: int, hour: int) -> dict[str, Any]:
    """The spec of test_load.py's schedules, at a minute of an hour 12 hours from now."""
    return {
        "schedule": f"{index % 60} {hour} * * *",
        "timeZone": ZONE,
        "task": {"query": f"digest {index}"},
        "agent": {"model": "offline-demo", "provider": "offline"},
        "budget": {"maxPerRunUSD": "0.10"},
    }


def agent_schedule(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AgentSchedule",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def baseline_cronjob(
    namespace: str, name: str, spec: dict[str, Any], settings: Settings, run_api: RunApiEndpoint
) -> dict[str, Any]:
    """What the operator renders for the schedule, less the ownerReference."""
    cronjob = render_cronjob(
        ScheduleRef(name, namespace, str(uuid.uuid4())),
        AgentScheduleSpec.model_validate(spec),
        settings,
        suspend=False,
        min_interval=timedelta(days=1),  # every spec here fires once a day
        run_api=run_api,
    )
    del cronjob["metadata"]["ownerReferences"]
    return cronjob


def spread(prefix: str, count: int, per_namespace: int) -> list[str]:
    """Namespaces for ``count`` schedules, at most ``per_namespace`` in each."""
    return [f"{prefix}-{i:02d}" for i in range(max(1, math.ceil(count / per_namespace)))]


# ---- measuring ----------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for a single sample."""
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_parallel(pool: ThreadPoolExecutor, call: Callable[[T], None], items: Iterable[T]) -> None:
    """``call(item)`` for every item on the client's threads; the first error is raised."""
    for future in [pool.submit(call, item) for item in items]:
        future.result()


def settle(api: Api, timeout: float = 90.0) -> Requests:
    """Wait until the operator's resources see no write for QUIET seconds (at most
    ``timeout``); the last scrape."""
    last = ours(delta(apiserver_requests(api), Counter(), WRITE_VERBS))
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = apiserver_requests(api)
        current = ours(delta(now, Counter(), WRITE_VERBS))
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= QUIET:
            return now
    return apiserver_requests(api)


def fmt_requests(requests: Requests, per: float = 1.0) -> list[str]:
    """ "VERB resource: count" (divided by ``per`` when given), most requested first."""
    return [
        f"{verb} {resource}: {n / per:.2f}" if per != 1 else f"{verb} {resource}: {n}"
        for (verb, resource), n in sorted(requests.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def machine() -> dict[str, Any]:
    """CPUs, CPU model, memory, kernel and Python of this machine."""
    model = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


@dataclass
class Bench:
    """One run: the cluster, the client, the tracker, the operator and what was measured."""

    args: argparse.Namespace
    api: Api
    tracker: Tracker
    operator: Operator
    cp: controlplane.ControlPlane
    pool: ThreadPoolExecutor
    hour: int
    raw: dict[str, Any] = field(default_factory=dict)
    loads: dict[str, float] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def phase_end(self, name: str) -> None:
        self.loads[name] = round(load_average(), 2)

    def run(
        self,
        keys: list[Key],
        base_keys: list[Key],
        idle_keys: list[Key],
        burst_keys: list[Key],
        probe: Key,
    ) -> None:
        """Every phase, in order: G4, G5 and G11 at exactly N schedules, G3's come last."""
        args = self.args
        time.sleep(QUIET)
        self.memory("0")
        self.log(f"baseline: applying {args.n} CronJobs")
        self.baseline(base_keys)
        per_namespace = math.ceil(args.n / args.namespaces)
        self.log(
            f"G1: creating {args.n} AgentSchedules over {args.namespaces} namespaces "
            f"({per_namespace} each)"
        )
        with self.profiled("create"):
            self.create(keys)
        self.memory(str(args.n))
        self.log(f"G11: idle for {args.idle_seconds:.0f} s")
        with self.profiled("idle"):
            self.idle(args.idle_seconds)
        self.memory("idle")  # what stays once the creation's transients are gone
        self.log("G5: SIGKILL and restart")
        self.restart(probe, args.n)
        self.log(f"G3: {args.idle_n} one second apart, then a burst of {args.burst}")
        self.latency(idle_keys, burst_keys, args.n)
        if args.runs:
            self.log(
                f"R: {args.runs} runs of {args.run_schedules} schedules report every "
                f"{args.run_interval:g} s for {args.run_seconds:g} s, first to a bare endpoint"
            )
            self.run_api(keys[: args.run_schedules])
        self.log("done; stopping the operator, the control plane and PostgreSQL")

    @contextmanager
    def profiled(self, phase: str) -> Iterator[None]:
        """With --profile DIR: py-spy samples the operator during the phase (it costs the
        operator some CPU, so figures of a profiled run are not the bench's figures)."""
        if not self.args.profile:
            yield
            return
        out = Path(self.args.profile) / f"{phase}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                *("record", "--pid", str(self.operator.pid), "--format", "raw"),
                *("--output", str(out), "--rate", "50", "--nonblocking", "--subprocesses"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            self.raw.setdefault("profile", {})[phase] = hot_spots(out)

    # -- baseline --
    def baseline(self, keys: list[Key]) -> None:
        settings = Settings(runner_image=RUNNER_IMAGE, run_api_url=self.operator.run_api_url)
        run_api = RunApiEndpoint(self.operator.run_api_url, self._run_api_ca())
        objects = [
            baseline_cronjob(ns, name, schedule_spec(i, self.hour), settings, run_api)
            for i, (ns, name) in enumerate(keys)
        ]
        before = apiserver_requests(self.api)
        began = time.monotonic()

        def apply(obj: dict[str, Any]) -> None:
            self.api.apply(cronjob_path(obj["metadata"]["namespace"], obj["metadata"]["name"]), obj)

        with self.cpu_used() as used:
            run_parallel(self.pool, apply, objects)
            done = self.tracker.wait(keys, ready=False, timeout=600, what="baseline CronJobs")
        writes = delta(apiserver_requests(self.api), before, WRITE_VERBS)
        # The same client applying the schedules themselves where no operator watches: G1
        # cannot be faster than their own creation.
        time.sleep(QUIET)
        began_alone = time.monotonic()

        def apply_schedule(item: tuple[int, Key]) -> None:
            index, key = item
            self.api.apply(
                schedule_path(*key), agent_schedule(*key, schedule_spec(index, self.hour))
            )

        run_parallel(self.pool, apply_schedule, enumerate(keys))
        self.raw["baseline"] = {
            "seconds": done - began,
            "writes_per_object": sum(ours(writes).values()) / len(keys),
            "writes": fmt_requests(writes),
            "schedules_alone_seconds": time.monotonic() - began_alone,
            "cpu_ms_per_object": {k: 1000 * v / len(keys) for k, v in used.items()},
        }
        self.phase_end("baseline")

    # -- G1, G2 --
    def create(self, keys: list[Key]) -> None:
        before = apiserver_requests(self.api)
        status_before = operator_metric(self.operator.metrics_url, STATUS_WRITES)
        sent: dict[Key, float] = {}

        def apply(item: tuple[int, Key]) -> None:
            index, key = item
            sent[key] = time.monotonic()
            self.api.apply(
                schedule_path(*key), agent_schedule(*key, schedule_spec(index, self.hour))
            )

        timeout = max(300.0, 1.2 * len(keys))
        with self.cpu_used() as used:
            began = time.monotonic()
            run_parallel(self.pool, apply, enumerate(keys))
            applied = time.monotonic()
            done = self.tracker.wait(keys, ready=True, timeout=timeout, what="schedules Ready")
        self.phase_end("create")
        self.log(f"G1: {len(keys)} schedules Ready after {done - began:.1f} s; settling")
        after = settle(self.api)
        writes = delta(after, before, WRITE_VERBS)
        own = Counter({("APPLY", f"{PLURAL}.{GROUP}"): len(keys)})
        operator_writes = ours(writes) - own
        ready = [self.tracker.ready_at[k] - sent[k] for k in keys]
        cronjob = [self.tracker.cronjob_seen[k] - sent[k] for k in keys]
        status_writes = operator_metric(self.operator.metrics_url, STATUS_WRITES) - status_before
        self.raw["G1"] = {
            "seconds": done - began,
            "client_seconds": applied - began,
            "ready_p50": percentile(ready, 50),
            "ready_p99": percentile(ready, 99),
            "cronjob_p50": percentile(cronjob, 50),
            "cronjob_p99": percentile(cronjob, 99),
            # CPU until the last schedule was Ready, per schedule (the bound of G1 here).
            "cpu_ms_per_schedule": {k: 1000 * v / len(keys) for k, v in used.items()},
        }
        self.raw["G2"] = {
            "writes_per_schedule": sum(operator_writes.values()) / len(keys),
            "by_verb_and_resource": fmt_requests(operator_writes, len(keys)),
            "background": fmt_requests(writes - ours(writes)),
            "status_writes_metric_per_schedule": status_writes / len(keys),
        }

    # -- G4 --
    def memory(self, label: str) -> None:
        self.raw.setdefault("G4", {})[f"rss_mib_at_{label}"] = rss_mib(self.operator.pid)
        traces = self.operator.trace_memory
        if traces is None:
            return
        dumps = len(list(traces.glob("*.txt")))
        os.kill(self.operator.pid, signal.SIGUSR1)
        wait_for(lambda: len(list(traces.glob("*.txt"))) > dumps, 120, "the memory dump")
        dump = traces / f"{dumps}.txt"
        time.sleep(1)  # written whole
        final = traces / f"at-{label}.txt"
        dump.rename(final)
        self.log(f"G4: live memory at {label}: {final.read_text().splitlines()[0]} ({final})")

    # -- G11 --
    def idle(self, seconds: float) -> None:
        before = apiserver_requests(self.api)
        passes = operator_metric(self.operator.metrics_url, RECONCILES)
        requests = operator_requests(self.operator.metrics_url)
        with self.cpu_used() as used:
            began = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - began
        passes = operator_metric(self.operator.metrics_url, RECONCILES) - passes
        requests = operator_requests(self.operator.metrics_url) - requests
        after = apiserver_requests(self.api)
        reads = delta(after, before, READ_VERBS)
        writes = delta(after, before, WRITE_VERBS)
        self.raw["G11"] = {
            "seconds": elapsed,
            "cpu_percent_of_a_core": {k: 100 * v / elapsed for k, v in used.items()},
            "reads": sum(reads.values()),
            "reads_by_verb_and_resource": fmt_requests(reads),
            "operator_reads": sum(ours(reads).values()),
            "passes": passes,
            # From the operator's own counter: what of the apiserver's reads are its.
            "operator_requests": dict(requests),
            "writes": fmt_requests(writes),
        }
        self.phase_end("idle")

    # -- G5 --
    def restart(self, probe: Key, count: int) -> None:
        before = apiserver_requests(self.api)
        log_offset = self.operator.log.stat().st_size
        self.operator.kill()
        killed, killed_wall = time.monotonic(), time.time()
        self.operator.spawn()
        with self.profiled("restart"):  # from the start of the new process, when profiling
            healthy_at, sent, first_pass = self._back_in_step(probe, count, log_offset)
        healthy_at, sent, first_pass = healthy_at - killed, sent - killed, first_pass - killed_wall
        probe_ready = self.tracker.ready_at[probe] - killed
        writes = ours(delta(apiserver_requests(self.api), before, WRITE_VERBS))
        writes[("APPLY", f"{PLURAL}.{GROUP}")] -= 1  # the probe's creation is the bench's
        self.raw["G5"] = {
            "definition": RESTART_DEFINITION,
            "seconds": max(probe_ready, first_pass),
            "to_liveness": healthy_at,
            "probe_create_to_ready": probe_ready - sent,
            "first_pass": first_pass,
            "reconciles_after_restart": operator_metric(self.operator.metrics_url, RECONCILES),
            "writes": sum(n for n in writes.values() if n > 0),
            "writes_by_verb_and_resource": fmt_requests(+writes),
        }
        self.phase_end("restart")

    def _back_in_step(self, probe: Key, count: int, log_offset: int) -> tuple[float, float, float]:
        """Wait for liveness, create the probe, wait for the first pass and the probe Ready:
        (liveness at, probe sent at, monotonic; first pass at, wall clock)."""
        self.operator.wait_healthy()
        healthy_at = sent = time.monotonic()
        self.api.apply(schedule_path(*probe), agent_schedule(*probe, schedule_spec(0, self.hour)))
        first_pass: float | None = None
        deadline = time.monotonic() + max(300.0, count * 0.6)
        while True:
            if first_pass is None:
                found = logged_at(self.operator.log, log_offset, FIRST_PASS)
                first_pass = found[0] if found else None
            if probe in self.tracker.ready_at and first_pass is not None:
                return healthy_at, sent, first_pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"G5: no '{FIRST_PASS}' in the operator's log")
            time.sleep(0.25)

    # -- G3 --
    def latency(self, idle: list[Key], burst: list[Key], offset: int) -> None:
        before = apiserver_requests(self.api)
        sent: dict[Key, float] = {}
        began = time.monotonic()
        for i, key in enumerate(idle):
            time.sleep(max(0.0, began + i - time.monotonic()))
            sent[key] = time.monotonic()
            self.api.apply(
                schedule_path(*key), agent_schedule(*key, schedule_spec(offset + i, self.hour))
            )
        self.tracker.wait(idle, ready=True, timeout=300, what="idle series")
        after = settle(self.api, timeout=30)
        writes = ours(delta(after, before, WRITE_VERBS))
        writes[("APPLY", f"{PLURAL}.{GROUP}")] -= len(idle)
        idle_lat = [self.tracker.cronjob_seen[k] - sent[k] for k in idle]
        idle_ready = [self.tracker.ready_at[k] - sent[k] for k in idle]
        self.phase_end("idle series")

        def apply(item: tuple[int, Key]) -> None:
            index, key = item
            sent[key] = time.monotonic()
            self.api.apply(
                schedule_path(*key), agent_schedule(*key, schedule_spec(index, self.hour))
            )

        run_parallel(self.pool, apply, enumerate(burst, start=offset + len(idle)))
        self.tracker.wait(burst, ready=True, timeout=600, what="burst")
        burst_lat = [self.tracker.cronjob_seen[k] - sent[k] for k in burst]
        burst_ready = [self.tracker.ready_at[k] - sent[k] for k in burst]
        self.raw["G3"] = {
            "idle_n": len(idle),
            "idle_cronjob_p50": percentile(idle_lat, 50),
            "idle_cronjob_p99": percentile(idle_lat, 99),
            "idle_ready_p50": percentile(idle_ready, 50),
            "idle_ready_p99": percentile(idle_ready, 99),
            "idle_writes_per_schedule": sum(n for n in writes.values() if n > 0) / len(idle),
            "burst_n": len(burst),
            "burst_cronjob_p50": percentile(burst_lat, 50),
            "burst_cronjob_p99": percentile(burst_lat, 99),
            "burst_ready_p99": percentile(burst_ready, 99),
        }
        self.phase_end("burst")

    # -- R --
    def run_api(self, schedules: list[Key]) -> None:
        args = self.args
        ca_pem = self._run_api_ca()
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runs-")))
            plans = self._plans(schedules, directory)
            # The bare endpoint: run_api_load's baseline, the run API's serve() and TLS setup
            # answering a fixed document (its History is never called).
            history = History.connect(self.operator.database_url)
            stack.callback(history.close)
            bare = RunApi(history)
            bare.app = bare_app()
            stack.enter_context(bare)
            children = stack.enter_context(multiprocessing.get_context("spawn").Pool(1))
            phase = (args.run_seconds, args.run_interval)
            base = children.apply(drive, (bare.url, bare.tls.ca_pem, plans, *phase))
            self.phase_end("runs, bare endpoint")
            with self.cpu_used() as used:
                real = children.apply(drive, (self.operator.run_api_url, ca_pem, plans, *phase))
        self.raw["R"] = {
            "runs": len(plans),
            "schedules": len(schedules),
            "interval": args.run_interval,
            "seconds": args.run_seconds,
            "baseline": call_figures(base),
            "operator": call_figures(real),
            "cpu_percent_of_a_core": {k: 100 * v / real.wall for k, v in used.items()},
        }
        self.phase_end("runs")

    def _run_api_ca(self) -> str:
        secret = self.api.get(f"/api/v1/namespaces/{TLS_NAMESPACE}/secrets/nocturne-run-api-tls")
        return base64.b64decode(secret["data"]["ca.crt"]).decode()

    @contextmanager
    def cpu_used(self) -> Iterator[dict[str, float]]:
        """CPU seconds the operator, the apiserver and etcd used during the block (the dict is
        filled when the block ends)."""
        pids = {
            "operator": self.operator.pid,
            "apiserver": self.cp.processes["kube-apiserver"].pid,
            "etcd": self.cp.processes["etcd"].pid,
        }
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        used: dict[str, float] = {}
        yield used
        used.update({name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})

    def _plans(self, schedules: list[Key], directory: Path) -> list[RunPlan]:
        """``--runs`` Jobs made from the schedules' CronJobs in turn, their pods (the Job
        controller's) and a token bound to each pod: one RunPlan per Job."""
        cronjobs = {
            key: self.api.get(cronjob_path(key[0], cronjob_name(key[1]))) for key in schedules
        }
        jobs: list[tuple[Key, dict[str, Any]]] = []

        def create(index: int) -> None:
            key = schedules[index % len(schedules)]
            cronjob = cronjobs[key]
            template = cronjob["spec"]["jobTemplate"]
            meta = cronjob["metadata"]
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": f"{meta['name']}-load-{index}",
                    "namespace": key[0],
                    "labels": (template.get("metadata") or {}).get("labels") or {},
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "CronJob",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": template["spec"],
            }
            resp = self.api.request("POST", f"/apis/batch/v1/namespaces/{key[0]}/jobs", json=job)
            if resp.status_code >= 300:
                raise RuntimeError(f"creating Job: {resp.status_code} {resp.text[:500]}")
            jobs.append((key, resp.json()))

        run_parallel(self.pool, create, range(self.args.runs))
        by_job = {job["metadata"]["uid"]: (key, job) for key, job in jobs}
        pods: dict[str, dict[str, Any]] = {}

        def all_pods() -> bool:
            for namespace in {key[0] for key in schedules}:
                listed = self.api.get(
                    f"/api/v1/namespaces/{namespace}/pods", labelSelector=JOB_NAME_LABEL
                )
                for pod in listed["items"]:
                    owners: list[dict[str, Any]] = pod["metadata"].get("ownerReferences") or []
                    owner = owners[0] if owners else {}
                    if owner.get("uid") in by_job:
                        pods[owner["uid"]] = pod
            return len(pods) == len(by_job)

        wait_for(all_pods, 120, "the Job controller's pods of the bench's runs")
        schedule_uids = {
            key: self.api.get(schedule_path(*key))["metadata"]["uid"] for key in schedules
        }
        plans: list[RunPlan] = []

        def plan(item: tuple[int, str]) -> None:
            index, job_uid = item
            key, _job = by_job[job_uid]
            pod = pods[job_uid]
            account = pod["spec"].get("serviceAccountName") or "default"
            request = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [TOKEN_AUDIENCE],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod["metadata"]["name"],
                        "uid": pod["metadata"]["uid"],
                    },
                },
            }
            resp = self.api.request(
                "POST", f"/api/v1/namespaces/{key[0]}/serviceaccounts/{account}/token", json=request
            )
            if resp.status_code >= 300:
                raise RuntimeError(f"TokenRequest: {resp.status_code} {resp.text[:500]}")
            token_file = directory / f"token-{index}"
            token_file.write_text(resp.json()["status"]["token"])
            run = RunRef(
                namespace=key[0],
                schedule=key[1],
                schedule_uid=schedule_uids[key],
                job_uid=job_uid,
                pod_uid=pod["metadata"]["uid"],
            )
            offset = random.uniform(0, self.args.run_interval)  # noqa: S311 - spread, not secret
            plans.append(RunPlan(str(token_file), run, offset))

        run_parallel(self.pool, plan, enumerate(by_job))
        return plans


def call_figures(samples: Samples) -> dict[str, Any]:
    """p50/p99/max per call and the errors the clients saw."""
    figures: dict[str, Any] = {}
    for endpoint, values in by_endpoint(samples).items():
        if not values:  # every call failed: the errors say why
            continue
        p50, _p95, p99, worst = percentiles(values)
        figures[endpoint] = {"n": len(values), "p50_ms": p50, "p99_ms": p99, "max_ms": worst}
    figures["errors"] = dict(samples.errors)
    figures["error_examples"] = dict(samples.examples)
    return figures


# ---- the profile --------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def hot_spots(collapsed: Path, top: int = 12) -> list[str]:
    """The operator's own functions (and the library calls they make, "f -> g") by their share
    of py-spy's samples (its active threads) that have them on the stack."""
    if not collapsed.exists():
        return []
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        seen: set[str] = set()
        frames = stack.split(";")
        for i, frame in enumerate(frames):
            match = _FRAME.match(frame)
            if match is None or "nocturne_operator" not in match["file"]:
                continue
            name = f"{match['function']} ({match['file'].rsplit('nocturne_operator/', 1)[-1]})"
            seen.add(name)
            callee = _FRAME.match(frames[i + 1]) if i + 1 < len(frames) else None
            if callee is not None and "nocturne_operator" not in callee["file"]:
                seen.add(f"{name} -> {callee['function']}")
        for name in seen:
            inclusive[name] += samples
    return [f"{100 * n / total:5.1f} % {name}" for name, n in inclusive.most_common(top) if total]


# ---- the report ---------------------------------------------------------------------------


def table(raw: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    n = args.n
    b, g1, g2, g3 = raw["baseline"], raw["G1"], raw["G2"], raw["G3"]
    g4, g5, g11 = raw["G4"], raw["G5"], raw["G11"]
    ratio = b["seconds"] / g1["seconds"]
    per_1000 = (g4[f"rss_mib_at_{n}"] - g4["rss_mib_at_0"]) / n * 1000
    top = "; ".join(g2["by_verb_and_resource"][:4])
    cpu = g11["cpu_percent_of_a_core"]
    resync_writes = g5["writes"]
    probe_share = g3["idle_writes_per_schedule"]
    rows = [
        ("id", "figure", "baseline / goal", "measured"),
        ("---", "---", "---", "---"),
        (
            "G1",
            f"create {n:,} schedules → all CronJobs exist and status Ready",
            f"bare client: {b['seconds']:.1f} s; goal ≥ 0.7x of it (the same client creating "
            f"the {n:,} AgentSchedules where no operator watches: "
            f"{b['schedules_alone_seconds']:.1f} s)",
            f"**{g1['seconds']:.1f} s ({ratio:.2f}x)**; create→Ready p50 {g1['ready_p50']:.1f} s,"
            f" p99 {g1['ready_p99']:.1f} s",
        ),
        (
            "G2",
            "apiserver writes per schedule created",
            f"{b['writes_per_object']:.2f} (the CronJob); goal ≤ 3",
            f"**{g2['writes_per_schedule']:.2f}**: {top}; nocturne_status_writes_total "
            f"{g2['status_writes_metric_per_schedule']:.2f}",
        ),
        (
            "G3",
            f"create → CronJob at idle, {g3['idle_n']} one second apart; burst of {g3['burst_n']}",
            "goal p50 0.2 s / p99 0.5 s; burst p99 10 s",
            f"**p50 {g3['idle_cronjob_p50']:.2f} s, p99 {g3['idle_cronjob_p99']:.2f} s; burst p99 "
            f"{g3['burst_cronjob_p99']:.1f} s**",
        ),
        (
            "G4",
            "operator memory per 1,000 schedules",
            "goal ≤ 20 MiB",
            f"**{per_1000:.0f} MiB** ({g4['rss_mib_at_0']:.0f} MiB at 0 → "
            f"{g4[f'rss_mib_at_{n}']:.0f} MiB at {n:,}; {g4['rss_mib_at_idle']:.0f} MiB after "
            "the idle phase)",
        ),
        (
            "G5",
            f"restart (SIGKILL) at {n:,}: back in step; writes during resync",
            "goal ≤ 5 s, 0 writes",
            f"**{g5['seconds']:.1f} s**, {max(0.0, resync_writes - probe_share):.0f} writes beyond "
            f"the probe schedule's own ({resync_writes} counted; one created at idle in G3 "
            f"costs {probe_share:.1f})",
        ),
        (
            "G11",
            f"idle CPU at {n:,}",
            "goal ≤ 1 % of a core",
            f"**{cpu['operator']:.1f} %** of a core, and {cpu['apiserver']:.1f} % of the "
            f"apiserver's; {g11['reads']:,} reads in {g11['seconds']:.0f} s of idle "
            f"({g11['operator_reads']:,} on the operator's resources, "
            f"{sum(g11['operator_requests'].values()):,} by the operator)",
        ),
    ]
    if "R" in raw:
        rows.append(run_api_row(raw["R"]))
    return ["| " + " | ".join(row) + " |" for row in rows]


def run_api_row(r: Mapping[str, Any]) -> tuple[str, str, str, str]:
    base, real = r["baseline"], r["operator"]

    def ms(figures: Mapping[str, Any], call: str, q: str) -> str:
        return f"{figures[call][q]:.0f}" if call in figures else "-"

    errors = sum(real["errors"].values())
    return (
        "R",
        f"run API: {r['runs']} runs of {r['schedules']} schedules, progress every "
        f"{r['interval']:g} s for {r['seconds']:g} s",
        f"bare endpoint, same clients: progress p50 {ms(base, 'progress', 'p50_ms')} ms, p99 "
        f"{ms(base, 'progress', 'p99_ms')} ms",
        f"**progress p50 {ms(real, 'progress', 'p50_ms')} ms, p99 "
        f"{ms(real, 'progress', 'p99_ms')} ms**; start p99 {ms(real, 'start', 'p99_ms')} ms, "
        f"finish p99 {ms(real, 'finish', 'p99_ms')} ms; operator CPU "
        f"{r['cpu_percent_of_a_core']['operator']:.1f} % of a core; {errors} errors",
    )


def details(raw: Mapping[str, Any]) -> list[str]:
    g1, g2, g3, g5, g11 = raw["G1"], raw["G2"], raw["G3"], raw["G5"], raw["G11"]
    lines = [
        f"baseline: {raw['baseline']['seconds']:.2f} s; CPU per CronJob: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in raw["baseline"]["cpu_ms_per_object"].items())
        + "; writes: "
        + ", ".join(raw["baseline"]["writes"]),
        f"G1: client done applying after {g1['client_seconds']:.2f} s; create→CronJob p50 "
        f"{g1['cronjob_p50']:.2f} s, p99 {g1['cronjob_p99']:.2f} s; CPU per schedule until "
        "the last was Ready: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in g1["cpu_ms_per_schedule"].items()),
        "G2 per schedule, by verb and resource: " + ", ".join(g2["by_verb_and_resource"]),
        "G2 background writes meanwhile (not the operator's resources): "
        + (", ".join(g2["background"]) or "none"),
        f"G3: create→Ready at idle p50 {g3['idle_ready_p50']:.2f} s, p99 "
        f"{g3['idle_ready_p99']:.2f} s; writes per idle schedule "
        f"{g3['idle_writes_per_schedule']:.2f}; burst create→CronJob p50 "
        f"{g3['burst_cronjob_p50']:.2f} s, create→Ready p99 {g3['burst_ready_p99']:.2f} s",
        f"G5: {g5['definition']}",
        f"G5: liveness after {g5['to_liveness']:.1f} s; probe create→Ready "
        f"{g5['probe_create_to_ready']:.1f} s; first pass done {g5['first_pass']:.1f} s "
        f"after the kill ({g5['reconciles_after_restart']:.0f} reconciles by then); writes: "
        + (", ".join(g5["writes_by_verb_and_resource"]) or "none"),
        f"G11: {g11['passes']:.0f} passes; the operator's own requests (its "
        "nocturne_kube_requests_total): "
        + (", ".join(f"{k}: {v}" for k, v in g11["operator_requests"].items()) or "none")
        + "; CPU % of a core: "
        + ", ".join(f"{k} {v:.2f}" for k, v in g11["cpu_percent_of_a_core"].items())
        + "; reads: "
        + (", ".join(g11["reads_by_verb_and_resource"]) or "none")
        + "; writes: "
        + (", ".join(g11["writes"]) or "none"),
        *(
            f"profile of the operator, {phase} (share of samples with the function on the "
            f"stack): " + "; ".join(spots)
            for phase, spots in (raw.get("profile") or {}).items()
        ),
        *(
            [
                "R: "
                + "; ".join(
                    f"{who} {call} n {f['n']} p50 {f['p50_ms']:.1f} p99 {f['p99_ms']:.1f} max "
                    f"{f['max_ms']:.1f} ms"
                    for who in ("baseline", "operator")
                    for call, f in raw["R"][who].items()
                    if call in ("start", "progress", "finish")
                )
                + "; errors: "
                + (json.dumps(raw["R"]["operator"]["error_examples"]) or "none")
                + "; CPU % of a core: "
                + ", ".join(f"{k} {v:.2f}" for k, v in raw["R"]["cpu_percent_of_a_core"].items())
            ]
            if "R" in raw
            else []
        ),
        "machine load (1-min average at each phase's end): "
        + ", ".join(f"{k} {v}" for k, v in raw["load_average"].items()),
    ]
    return lines


def start_servers(stack: ExitStack, state: Path) -> tuple[controlplane.ControlPlane, str]:
    """The control plane and a migrated PostgreSQL schema (its URL), stopped with ``stack``."""
    cp = controlplane.start(state / "cluster", log=lambda _m: None)
    stack.callback(cp.stop)
    postgres = stack.enter_context(running_postgres())
    url = postgres.fresh_schema("bench")
    upgrade(url)
    return cp, url


def install_crds(api: Api) -> None:
    """Apply crds/ and wait until the AgentSchedule CRD is established."""
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        doc = yaml.safe_load(crd.read_text())
        api.apply(f"{base}/{doc['metadata']['name']}", doc)

    def established() -> bool:
        conditions = (api.get(f"{base}/{PLURAL}.{GROUP}").get("status") or {}).get("conditions")
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions or [])

    wait_for(established, 60, "the CRD to be established")


def main(args: argparse.Namespace) -> None:
    began = time.monotonic()
    per_namespace = math.ceil(args.n / args.namespaces)
    hour = (datetime.now(ZoneInfo(ZONE)).hour + 12) % 24
    keys = [(f"sched-{i % args.namespaces:02d}", f"s{i:04d}") for i in range(args.n)]
    base_keys = [(f"base-{i % args.namespaces:02d}", f"s{i:04d}") for i in range(args.n)]
    idle_ns = spread("late-idle", args.idle_n, 40)
    burst_ns = spread("late-burst", args.burst, 40)
    idle_keys = [(idle_ns[i % len(idle_ns)], f"i{i:04d}") for i in range(args.idle_n)]
    burst_keys = [(burst_ns[i % len(burst_ns)], f"b{i:04d}") for i in range(args.burst)]
    probe = ("late-probe", "probe")
    namespaces = sorted({k[0] for k in [*keys, *base_keys, *idle_keys, *burst_keys, probe]})
    with ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nocturne-scale-")))
        cp, url = start_servers(stack, state)
        api = Api(cp, args.clients)
        stack.callback(api.http.close)
        pool = stack.enter_context(ThreadPoolExecutor(args.clients))
        install_crds(api)

        def create_namespace(name: str) -> None:
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            api.apply(f"/api/v1/namespaces/{name}", namespace)

        run_parallel(pool, create_namespace, namespaces)
        tracker = Tracker(api)
        tracker.start()
        stack.callback(tracker.stop)
        # health, metrics, run API: fixed ports, so a restart serves where its predecessor did
        health, metrics, run_api = controlplane.free_ports(3)
        log = state / "operator.log"
        operator = Operator(cp, url, "sched-*,late-*", log, health, metrics, run_api, per_namespace)
        if args.trace_memory:
            operator.trace_memory = Path(args.trace_memory).resolve()
            operator.trace_memory.mkdir(parents=True, exist_ok=True)
        operator.spawn()
        stack.callback(operator.stop)
        operator.wait_healthy()
        bench = Bench(args, api, tracker, operator, cp, pool, hour)
        bench.log(
            f"control plane, PostgreSQL and the operator up after "
            f"{time.monotonic() - began:.0f} s; settling"
        )
        bench.run(keys, base_keys, idle_keys, burst_keys, probe)
        raw = {**bench.raw, "load_average": bench.loads}
    raw["config"] = {
        "n": args.n,
        "namespaces": args.namespaces,
        "idle_n": args.idle_n,
        "burst": args.burst,
        "idle_seconds": args.idle_seconds,
        "clients": args.clients,
        "runs": args.runs,
        "schedule": f"M {hour} * * * in {ZONE} (M = index mod 60)",
        "runtime_seconds": round(time.monotonic() - began, 1),
    }
    raw["machine"] = machine()
    raw["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report(raw, args)


def report(raw: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table and the raw figures; with --json, write them too."""
    m = raw["machine"]
    print()
    print(
        f"operator scale, {raw['date']}: {args.n} schedules over {args.namespaces} namespaces; "
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}; bench runtime {raw['config']['runtime_seconds']} s"
    )
    print()
    for line in table(raw, args):
        print(line)
    print()
    for line in details(raw):
        print(line)
    if args.json:
        text = json.dumps(raw, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="schedules (default 1000)")
    parser.add_argument("--namespaces", type=int, default=25, help="over namespaces (25)")
    parser.add_argument("--idle-n", type=int, default=50, help="G3: one second apart (50)")
    parser.add_argument("--burst", type=int, default=200, help="G3: created at once (200)")
    parser.add_argument(
        "--idle-seconds", type=float, default=300.0, help="G11: idle window (300 s)"
    )
    parser.add_argument("--clients", type=int, default=8, help="client threads (8)")
    parser.add_argument("--runs", type=int, default=200, help="R: concurrent runs (200; 0: none)")
    parser.add_argument(
        "--run-schedules", type=int, default=20, help="R: of that many schedules (20)"
    )
    parser.add_argument("--run-interval", type=float, default=5.0, help="R: progress every (5 s)")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="R: each run lasts (60 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures ('-': stdout)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy (pip install py-spy) samples the operator while creating and at idle; "
        "collapsed stacks go to DIR, the hot spots into the output (skews the figures)",
    )
    parser.add_argument(
        "--trace-memory",
        metavar="DIR",
        help="run the operator under tracemalloc (bench/traced_operator.py); what it holds "
        "live at 0 and at N goes to DIR/at-0.txt and DIR/at-N.txt (skews the figures)",
    )
    args = parser.parse_args(argv)
    if min(args.n, args.namespaces, args.idle_n, args.burst, args.clients) < 1:
        parser.error("--n, --namespaces, --idle-n, --burst and --clients must be at least 1")
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be > 0")
    if args.runs < 0 or not 1 <= args.run_schedules <= args.n:
        parser.error("--runs must be >= 0 and --run-schedules between 1 and --n")
    if args.run_interval <= 0 or args.run_seconds < args.run_interval:
        parser.error("--run-interval must be > 0 and --run-seconds at least one interval")
    return args


if __name__ == "__main__":
    main(parse_args())
