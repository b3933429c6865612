"""A real Kubernetes control plane on loopback: etcd -> kube-apiserver -> kube-controller-manager,
each its own process of the ``kube-local`` busybox, started with upstream flags on free ports.

Used by the e2e session fixture and by ``make demo`` (``python -m harness.controlplane``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import build
from harness.pki import FRONT_PROXY_CLIENT, Pki, make_pki, pki_in

CONTROLLERS = (
    "cronjob-controller",
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "pod-garbage-collector-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    # Publishes kube-root-ca.crt into every namespace; in-cluster clients (the operator's pod)
    # read it through the projected service-account volume.
    "root-ca-certificate-publisher-controller",
    # Aggregates ClusterRoles labelled aggregate-to-view/edit/admin (the agentruns readers).
    "clusterrole-aggregation-controller",
    # Takes the node's not-ready taint off once its kubelet reports Ready (harness.node).
    "node-lifecycle-controller",
)
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")


class ControlPlaneError(RuntimeError):
    """A component failed to start or become ready; the message carries its log tail."""


@dataclass
class ControlPlane:
    """Handle on a running control plane; ``kubeconfig`` is an admin (system:masters) kubeconfig."""

    state_dir: Path
    binary: Path
    pki: Pki
    etcd_port: int
    api_port: int
    kubeconfig: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        """HTTPS URL of the kube-apiserver."""
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def log_dir(self) -> Path:
        """Directory with one log file per component."""
        return self.state_dir / "logs"

    def log_tail(self, component: str, lines: int = 60) -> str:
        """Last ``lines`` lines of a component's log, for readable failures."""
        path = self.log_dir / f"{component}.log"
        if not path.exists():
            return f"(no log at {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)

    def write_token_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """Write a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        _write_kubeconfig(path, self.server, self.pki.ca_cert, {"token": token}, namespace)
        return path

    def restart_apiserver(
        self, *, grace_seconds: float = 5.0, down_seconds: float = 0.0, timeout: float = 90.0
    ) -> None:
        """Stop the kube-apiserver (SIGTERM, SIGKILL after ``grace_seconds``: it stops listening
        at once but may linger in shutdown), keep it down ``down_seconds``, start it again with
        the same flags and port and wait until it serves: an apiserver outage that clients
        (watches, controllers) must ride out."""
        proc = self.processes.pop("kube-apiserver", None)
        if proc is not None:
            terminate(proc, grace_seconds)
        time.sleep(down_seconds)
        self.processes["kube-apiserver"] = _spawn(self, "kube-apiserver", _apiserver_args(self))
        _wait(self, "kube-apiserver", lambda: _api_ready(self), timeout)
        _remember_pids(self)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every component (newest first), SIGKILL after ``timeout``; idempotent."""
        for name in reversed(COMPONENTS):
            proc = self.processes.pop(name, None)
            if proc is not None:
                terminate(proc, timeout)
        _forget_pids(self.state_dir)


def start(
    state_dir: Path, binary: Path | None = None, *, log: Callable[[str], None] = print
) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager and wait until all are ready."""
    binary = binary or build.ensure()
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    pki = make_pki(state_dir / "pki")
    kubeconfig = state_dir / "admin.kubeconfig"
    etcd_port, peer_port, api_port = free_ports(3)
    cp = ControlPlane(state_dir, binary, pki, etcd_port, api_port, kubeconfig)
    _write_kubeconfig(
        kubeconfig,
        cp.server,
        pki.ca_cert,
        {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
        "default",
    )
    started = time.monotonic()
    try:
        cp.processes["etcd"] = _spawn(cp, "etcd", _etcd_args(state_dir, etcd_port, peer_port))
        _wait(cp, "etcd", lambda: _etcd_healthy(etcd_port), 30)
        log(f"[control-plane] etcd ready on :{etcd_port} ({time.monotonic() - started:.1f} s)")
        cp.processes["kube-apiserver"] = _spawn(cp, "kube-apiserver", _apiserver_args(cp))
        _wait(cp, "kube-apiserver", lambda: _api_ready(cp), 90)
        log(
            f"[control-plane] kube-apiserver ready on :{api_port} "
            f"({time.monotonic() - started:.1f} s)"
        )
        cp.processes["kube-controller-manager"] = _spawn(
            cp, "kube-controller-manager", _kcm_args(cp)
        )
        # The default ServiceAccount appearing proves the controllers run.
        _wait(cp, "kube-controller-manager", lambda: _default_sa_exists(cp), 60)
        log(f"[control-plane] kube-controller-manager ready ({time.monotonic() - started:.1f} s)")
    except BaseException:
        cp.stop()
        raise
    _remember_pids(cp)
    return cp


@contextmanager
def running(state_dir: Path, binary: Path | None = None) -> Iterator[ControlPlane]:
    """Context manager: a started control plane, stopped on exit."""
    cp = start(state_dir, binary)
    try:
        yield cp
    finally:
        cp.stop()


def _etcd_args(state_dir: Path, port: int, peer: int) -> list[str]:
    client, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    return [
        "--name=local",
        f"--data-dir={state_dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=local={peer_url}",
        "--listen-metrics-urls=",
        # Test data is thrown away; fsync only costs time (envtest does the same).
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def _apiserver_args(cp: ControlPlane) -> list[str]:
    pki = cp.pki
    return [
        f"--etcd-servers=http://127.0.0.1:{cp.etcd_port}",
        "--bind-address=127.0.0.1",
        f"--secure-port={cp.api_port}",
        # A loopback advertise address cannot be written into the `kubernetes` Endpoints; with no
        # reconciler nothing tries to.
        "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",
        f"--cert-dir={cp.state_dir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.apiserver_cert}",
        f"--tls-private-key-file={pki.apiserver_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-account-key-file={pki.sa_pub}",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--authorization-mode=RBAC",
        # MutatingAdmissionPolicy (beta in 1.35, off by default): the real node's policy puts
        # the suite's pods on the host network (harness.node.HOST_NETWORK_POLICY).
        "--feature-gates=MutatingAdmissionPolicy=true",
        "--runtime-config=admissionregistration.k8s.io/v1beta1=true",
        # The aggregation layer (aggregated APIs such as agentruns): the apiserver proxies with
        # its front-proxy client certificate and names the user in these headers.
        f"--requestheader-client-ca-file={pki.front_proxy_ca}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
        f"--proxy-client-key-file={pki.front_proxy_client_key}",
        # The kubelet (harness.node): the apiserver reaches it by its InternalIP, never by its
        # name (a DNS query that would leave the machine), as admin, and checks its certificate.
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-client-certificate={pki.admin_cert}",
        f"--kubelet-client-key={pki.admin_key}",
        f"--kubelet-certificate-authority={pki.ca_cert}",
        "--profiling=false",
        "--v=1",
    ]


def _kcm_args(cp: ControlPlane) -> list[str]:
    return [
        f"--kubeconfig={cp.kubeconfig}",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--root-ca-file={cp.pki.ca_cert}",
        "--leader-elect=false",
        # 0 = serve no HTTPS at all, so concurrent runs never collide on 10257.
        "--secure-port=0",
        "--use-service-account-credentials=false",
        "--v=1",
    ]


def _spawn(cp: ControlPlane, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    log = (cp.log_dir / f"{name}.log").open("ab")
    try:
        return subprocess.Popen(
            [str(cp.binary), name, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: teardown kills children too
        )
    finally:
        log.close()


def _wait(cp: ControlPlane, name: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    proc = cp.processes[name]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ControlPlaneError(
                f"{name} exited with code {proc.returncode} during start-up\n{cp.log_tail(name)}"
            )
        if ready():
            return
        time.sleep(0.25)
    raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s\n{cp.log_tail(name)}")


def _etcd_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def ssl_context(pki: Pki) -> ssl.SSLContext:
    """TLS context that trusts the local CA and presents the admin client certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return ctx


def api_get(cp: ControlPlane, path: str) -> tuple[int, bytes]:
    """GET an apiserver path as admin; returns (status, body); network errors give status 0."""
    req = urllib.request.Request(cp.server + path)
    try:
        with urllib.request.urlopen(req, context=ssl_context(cp.pki), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def _api_ready(cp: ControlPlane) -> bool:
    if api_get(cp, "/readyz")[0] != 200:
        return False
    return all(
        api_get(cp, f"/api/v1/namespaces/{ns}")[0] == 200 for ns in ("default", "kube-system")
    )


def _default_sa_exists(cp: ControlPlane) -> bool:
    return api_get(cp, "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``timeout`` s; a no-op once it exited."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bind :0, read, close; a start retry covers the tiny race)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_kubeconfig(
    path: Path, server: str, ca: Path, user: dict[str, str], namespace: str
) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "nocturne-local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "nocturne-local-user", "user": user}],
        "contexts": [
            {
                "name": "nocturne-local",
                "context": {
                    "cluster": "nocturne-local",
                    "user": "nocturne-local-user",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "nocturne-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- detached mode for `make demo`: the processes outlive this Python process ----------------


def _remember_pids(cp: ControlPlane) -> None:
    data = {"pids": {n: p.pid for n, p in cp.processes.items()}, "server": cp.server}
    (cp.state_dir / "pids.json").write_text(json.dumps(data))


def _forget_pids(state_dir: Path) -> None:
    (state_dir / "pids.json").unlink(missing_ok=True)


def down(state_dir: Path) -> bool:
    """Stop a detached control plane started by ``up``; returns False if none was running."""
    pid_file = state_dir / "pids.json"
    if not pid_file.exists():
        return False
    pids: dict[str, int] = json.loads(pid_file.read_text())["pids"]
    for name in reversed(COMPONENTS):
        pid = pids.get(name)
        if pid is not None:
            stop_group(pid, timeout=20)
    pid_file.unlink()
    return True


def attached(state_dir: Path) -> ControlPlane:
    """A handle on the detached control plane recorded in ``state_dir`` (for starting a node
    beside it); its processes stay the ``up`` command's."""
    server: str = json.loads((state_dir / "pids.json").read_text())["server"]
    api_port = int(server.rsplit(":", 1)[1])
    kubeconfig = state_dir / "admin.kubeconfig"
    return ControlPlane(
        state_dir, build.ensure(), pki_in(state_dir / "pki"), 0, api_port, kubeconfig
    )


def is_up(state_dir: Path) -> bool:
    """True when a detached control plane recorded in ``state_dir`` is still running."""
    pid_file = state_dir / "pids.json"
    if not pid_file.exists():
        return False
    pids: dict[str, int] = json.loads(pid_file.read_text())["pids"]
    return all(alive(pid) for pid in pids.values())


def stop_group(pid: int, *, timeout: float) -> None:
    """SIGTERM a detached process group, SIGKILL it after ``timeout``; fine if already gone."""
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while the process exists (a zombie child of ours is reaped and counts as gone)."""
    if pid <= 0:  # kill(0) would signal our own process group: no process recorded
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours still answers kill(0); reap it if it is our child.
    with suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: ``up`` starts a detached control plane in ``--dir``; ``down`` stops it."""
    parser = argparse.ArgumentParser(prog="python -m harness.controlplane")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".nocturne/cluster"))
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.resolve()
    if args.command == "down":
        print("[control-plane] stopped" if down(state_dir) else "[control-plane] was not running")
        return 0
    if args.command == "status":
        up = is_up(state_dir)
        print(f"[control-plane] {'running' if up else 'not running'} ({state_dir})")
        return 0 if up else 1
    if is_up(state_dir):
        print(f"[control-plane] already running; KUBECONFIG={state_dir / 'admin.kubeconfig'}")
        return 0
    down(state_dir)
    # A fresh PKI with an old etcd data dir would leave tokens and members inconsistent.
    shutil.rmtree(state_dir, ignore_errors=True)
    cp = start(state_dir)
    cp.processes.clear()  # detach: the components keep running after we exit
    print(f"[control-plane] up. export KUBECONFIG={cp.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
