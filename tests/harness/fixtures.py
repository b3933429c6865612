"""The harness as a pytest plugin: a real cluster for the session, a real node, kubectl,
PostgreSQL, and fresh namespaces. Loaded by ``tests/conftest.py``; product tests build on it.

Local mode (default): build/reuse ``kube-local``, start etcd -> kube-apiserver ->
kube-controller-manager on free loopback ports and, for tests that run pods, a real node
(kubelet, kube-scheduler, containerd) with the project's images.
kind mode: ``NOCTURNE_E2E_KUBECONFIG=/path/to/kind.kubeconfig`` runs the same tests against it
(no local control plane, no local node: kind's kubelet runs the pods).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kubernetes import client, config

from harness import build, controlplane, images, tools
from harness import node as real_node
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer, running_postgres
from harness.prerequisites import skip_or_fail


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (initdb in a temp dir, free port)."""
    with running_postgres() as server:
        yield server


_cluster_for_reports: list[Cluster] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running cluster for the whole session."""
    external = os.environ.get("NOCTURNE_E2E_KUBECONFIG")
    state_dir = tmp_path_factory.mktemp("cluster")
    if external:
        cfg = Path(external)
        api = config.new_client_from_config(config_file=str(cfg))
        yield Cluster(cfg, api.configuration.host, state_dir, None)
        return
    if build.go_binary() is None:
        skip_or_fail("e2e tests need the Go toolchain ('go' on PATH) to build kube-local")
    try:
        binary = build.ensure()
    except build.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    cp = controlplane.start(state_dir, binary)
    found = Cluster(cp.kubeconfig, cp.server, state_dir, cp)
    _cluster_for_reports.append(found)
    try:
        yield found
    finally:
        _cluster_for_reports.clear()
        cp.stop()


# The names pods use for the project's images (the kind workflow loads them under the same names).
IMAGE_TAG = "e2e"
# What the suite's plain shell pods name (no registry here: the Debian base stands in).
SHELL_IMAGES = ("busybox:latest", "busybox:1.37")
KUBECTL_IMAGE = "registry.k8s.io/kubectl:v1.35.2"  # the pinned kubectl of tools.py


@pytest.fixture(scope="session")
def node(cluster: Cluster) -> Iterator[real_node.Node | None]:
    """A real node (kubelet, kube-scheduler, containerd, CNI bridge) with the project's images
    built from its Dockerfiles as ``nocturne-operator:e2e`` and ``nocturne-runner:e2e``, and
    the Debian base as ``busybox`` (a shell and its tools); None against kind, whose kubelet
    runs the pods."""
    if cluster.local is None:
        yield None
        return
    missing = images.missing_tools() + [
        t for t in ("containerd", "ctr", "unshare") if shutil.which(t) is None
    ]
    if missing or os.geteuid() != 0:
        skip_or_fail(f"the real node needs root and {', '.join(missing) or 'nothing else'}")
    try:
        built = images.ensure_all()
    except images.ImageBuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    started = real_node.start(cluster.local, cluster.state_dir / "node", built["pause"])
    _node_for_reports.append(started)
    try:
        for image in images.IMAGES:
            started.import_image(built[image.name], f"{image.name}:{IMAGE_TAG}")
        started.import_image(built["base"], *SHELL_IMAGES)
        started.import_image(built["kubectl"], KUBECTL_IMAGE)
        yield started
    finally:
        _node_for_reports.clear()
        started.stop()


_node_for_reports: list[real_node.Node] = []


@pytest.fixture(scope="session")
def kube(cluster: Cluster) -> Iterator[client.ApiClient]:
    """An admin API client."""
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def cli_tools() -> tools.Tools:
    """Verified kubectl and helm binaries."""
    return tools.ensure()


@pytest.fixture(scope="session")
def kubectl(cluster: Cluster, cli_tools: tools.Tools) -> Kubectl:
    """kubectl against the cluster under test."""
    return Kubectl(cli_tools.kubectl, cluster.kubeconfig)


@contextmanager
def fresh_namespace(kubectl: Kubectl, name: str, *, host_network: bool = True) -> Iterator[str]:
    """Create namespace ``name``, wait for its default ServiceAccount; delete it afterwards.
    Its pods run on the real node on the host network (where the suite's servers listen), or,
    with ``host_network=False``, on the node's bridge: they reach the host at ``Node.host_ip``
    only."""
    kubectl("create", "namespace", name)
    if not host_network:
        labels = [f"{k}={v}" for k, v in real_node.pod_network().items()]
        kubectl("label", "namespace", name, *labels)
    # Pods need the namespace's default ServiceAccount (ServiceAccount admission).
    wait_for(
        lambda: kubectl("get", "serviceaccount", "default", "-n", name, check=False),
        30,
        f"the default ServiceAccount in {name}",
    )
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


def namespace_name(request: pytest.FixtureRequest, prefix: str = "") -> str:
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[: 40 - len(prefix)].strip("-")
    return f"{prefix}{base}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (the namespace controller finalises it)."""
    with fresh_namespace(kubectl, namespace_name(request)) as name:
        yield name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the control plane's log tails to a failed test, so failures are readable."""
    report = yield
    if report.failed and _cluster_for_reports:
        report.sections.append(("control-plane logs", _cluster_for_reports[0].log_tails()))
    if report.failed and _node_for_reports:
        found = _node_for_reports[0]
        tails = "\n".join(found.log_tail(c, 40) for c in ("kubelet", "containerd"))
        report.sections.append(("node logs", tails))
    return report
