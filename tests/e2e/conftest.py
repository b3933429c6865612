"""End-to-end fixtures of the product: the CRDs, the history database, the operator as a real
process. The cluster, the real node, kubectl and namespaces come from the harness
(``harness.fixtures``, loaded by ``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from harness import controlplane
from harness.fixtures import fresh_namespace, namespace_name
from harness.kube import Cluster, Kubectl, healthy, wait_for
from harness.node import Node
from harness.postgres import PostgresServer, start_postgres, stop_postgres
from integration.llm_server import OPENAI_PATH, Recorded, Reply, ScriptedServer, openai_reply
from nocturne_operator.storage import upgrade

# Namespaces the session operator leaves alone: chart-* for operators installed by the Helm chart
# (test_helm.py), solo-* for tests that run their own operator (test_resilience.py).
SOLO_NAMESPACE_PREFIX = "solo-"
SESSION_OPERATOR_EXCLUDES = "!chart-*,!solo-*"


@dataclass
class Model:
    """The local model of the solo-operator tests: every call is answered, ``delay`` seconds
    late."""

    delay: float = 0.0

    def __call__(self, request: Recorded) -> Reply:
        return replace(openai_reply("Three stories today.")(request), delay=self.delay)


@pytest.fixture
def model() -> Iterator[tuple[Model, ScriptedServer]]:
    """The local OpenAI-compatible server runner pods call, and its knob (test_fence.py has a
    model of its own)."""
    answers = Model()
    with ScriptedServer() as site:
        site.route(OPENAI_PATH, answers, method="POST")
        yield answers, site


@pytest.fixture
def solo_namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace that only an operator started by the test itself serves."""
    with fresh_namespace(kubectl, namespace_name(request, SOLO_NAMESPACE_PREFIX)) as name:
        yield name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the operators' log tails to a failed e2e test (the harness adds the cluster's)."""
    report = yield
    if report.failed:
        for running in [*_operators_for_reports, *_test_operators]:
            tail = "\n".join(running.log_text().splitlines()[-80:])
            report.sections.append((f"{running.log.stem} log", tail))
    if report.when == "teardown":
        _test_operators.clear()
    return report


REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"


@dataclass(frozen=True)
class OperatorProcess:
    """The operator running as a subprocess against the cluster; its log is kept for failures."""

    process: subprocess.Popen[bytes]
    log: Path
    metrics_url: str

    def log_text(self) -> str:
        """Everything the operator logged so far."""
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        """What its /metrics endpoint serves now."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text: str = resp.read().decode()
        return text

    def stop(self) -> None:
        """SIGTERM (kopf's graceful shutdown), SIGKILL after 30 s; a no-op once it exited."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@contextmanager
def operator_process(
    cluster: Cluster,
    *,
    database_url: str | None,
    watch_namespaces: str,
    extra_env: Mapping[str, str] | None = None,
    log_name: str = "operator",
    reports: list[OperatorProcess] | None = None,
    run_api_port: int | None = None,
) -> Iterator[OperatorProcess]:
    """Run ``python -m nocturne_operator`` from when its health endpoint answers until the block
    ends. Its log goes to ``<state dir>/<log_name>.log`` and is attached to the report of a
    failing test (``reports``: by default the current test's, also after the block has ended).
    ``run_api_port``: keep the run API where a predecessor served it (a restart, not a move)."""
    log = cluster.state_dir / f"{log_name}.log"
    health_port, metrics_port, free_run_api_port = controlplane.free_ports(3)
    run_api_port = run_api_port or free_run_api_port
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PYTHONSAFEPATH": "1",
        "NOCTURNE_HEALTH_ENDPOINT": f"http://127.0.0.1:{health_port}/healthz",
        "NOCTURNE_RUNNER_IMAGE": "nocturne-runner:e2e",
        "NOCTURNE_WATCH_NAMESPACES": watch_namespaces,
        "NOCTURNE_METRICS_PORT": str(metrics_port),
        # Tests serve pages on loopback; production keeps the SSRF guard's default.
        "NOCTURNE_WEB_FETCH_ALLOW_PRIVATE": "true",
        # Runner pods share the host network here (harness.node): they reach the run API on
        # loopback. Its CA lives in a Secret of `default`, so every operator the
        # tests start (and restart) serves the certificate the running Jobs trust.
        "NOCTURNE_RUN_API_PORT": str(run_api_port),
        "NOCTURNE_RUN_API_BIND": "127.0.0.1",
        "NOCTURNE_RUN_API_URL": f"https://127.0.0.1:{run_api_port}",
        "NOCTURNE_RUN_API_TLS_NAMESPACE": "default",
        # The tests' webhook receivers listen on loopback, in Secrets named "webhook".
        "NOCTURNE_WEBHOOK_ALLOW_PRIVATE": "true",
        "NOCTURNE_WEBHOOK_SECRETS": '["webhook", "slack"]',
        # The agentruns API only where a test asks for it (one APIService per cluster).
        "NOCTURNE_RUNS_API_PORT": "0",
        "NOCTURNE_RUNS_API_APISERVICE": "",
        # Every operator leads its own installation: a Lease of its own (test_replicas.py
        # gives two processes one Lease).
        "NOCTURNE_LEADER_LEASE_NAME": f"nocturne-{log_name}-{uuid.uuid4().hex[:8]}",
        **(extra_env or {}),
    }
    if database_url is not None:
        env["NOCTURNE_DATABASE_URL"] = database_url
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nocturne_operator"],
            env=env,
            cwd="/",
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = OperatorProcess(proc, log, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        try:
            # kopf answers its liveness endpoint once startup handlers have run.
            wait_for(
                lambda: proc.poll() is not None or healthy(health_port),
                60,
                "the operator's health endpoint",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; operator log:\n{running.log_text()}") from None
        if proc.poll() is not None:
            raise AssertionError(f"operator exited with {proc.returncode}:\n{running.log_text()}")
        (_test_operators if reports is None else reports).append(running)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    """Install the CRDs and wait until they are served."""
    kubectl("apply", "--server-side", "-f", str(CRD_DIR))
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/agentschedules.nocturne.dev"
    )


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test alone (it is stopped and started), migrated."""
    server = start_postgres()
    try:
        upgrade(server.url)
        yield server
    finally:
        stop_postgres(server.data_dir)


@pytest.fixture(scope="session")
def history_url(postgres: PostgresServer) -> str:
    """The history database of the session's operator and runner pods, migrated once."""
    url = postgres.fresh_schema("e2e_history")
    upgrade(url)
    return url


@pytest.fixture
def runner_database(history_url: str, namespace: str) -> str:
    """The history database this test reads. Runner pods get no credential of it: they report
    through the operator's run API (the name stays from when they did)."""
    return history_url


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crds: None, node: Node | None, history_url: str
) -> Iterator[OperatorProcess]:
    """``python -m nocturne_operator`` with a fast drift timer, as a real separate process."""
    with operator_process(
        cluster,
        database_url=history_url,
        watch_namespaces=SESSION_OPERATOR_EXCLUDES,
        reports=_operators_for_reports,
    ) as running:
        yield running


# The session operator, and operators the current test started (dropped after its teardown).
_operators_for_reports: list[OperatorProcess] = []
_test_operators: list[OperatorProcess] = []
