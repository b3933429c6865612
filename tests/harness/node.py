"""A real node for the local control plane: upstream kubelet and kube-scheduler (from the
kube-local busybox), Debian's containerd and runc, and a CNI bridge that reaches nothing but the
host. Images come from ``harness.images`` and are imported into this node's own containerd.

Everything a node creates on the host is its own and is listed in a record under
``/run/nocturne-node/<id>/`` before it is created: its bridge (a /24 of 10.244.0.0/16 no other
node holds), its cgroup root, its containerd (own socket, root, state, runc root, netns mounts),
its kubelet (own ports, root dir). ``stop`` removes all of it, also after a failed start; a node
whose owning process died without stopping it (SIGKILL) is removed by the next ``start`` on the
machine. Two test runs at once therefore never collide.

The host keeps its settings: the kubelet runs in a mount namespace of its own in which the three
sysctl files it would write (``vm.overcommit_memory``, ``kernel.panic``,
``kernel.panic_on_oops``) are plain files, it edits no firewall (``makeIPTablesUtilChains:
false``), and the bridge plugin neither masquerades nor turns on forwarding (the bridge is not
its gateway: it is made here, with its address, before the first pod). Pods get no default route
and an empty resolv.conf: no packet and no DNS query of theirs leaves the machine.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from kubernetes import client, config

from harness import tools
from harness.controlplane import (
    ControlPlane,
    ControlPlaneError,
    alive,
    free_ports,
    terminate,
)
from harness.images import BuiltImage
from harness.pki import issue_certificate

RECORDS = Path("/run/nocturne-node")
NODE_NAME = "nocturne-node"
_CGROUP_FS = Path("/sys/fs/cgroup")
_TASKS = Path("io.containerd.runtime.v2.task") / "k8s.io"
# Host sysctls the kubelet sets at start (container_manager_linux.go, setupKernelTunables);
# in its mount namespace these paths are files of the node's.
_KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
)
_SUBNETS = ipaddress.ip_network("10.244.0.0/16")
# A test's second node: nothing tolerates its taint, so only pods naming it in nodeName run there.
PRIVATE_TAINT = "nocturne.test/private-node"


class NodeError(ControlPlaneError):
    """A node part failed to start or become ready; the message carries its log tail."""


@dataclass
class Record:
    """What one node owns on the host, written before it is created (so a clean-up after a
    crash knows it)."""

    id: str
    owner_pid: int
    state_dir: str
    name: str = NODE_NAME
    private: bool = False
    bridge: str = ""
    subnet: str = ""
    cgroup: str = ""

    @property
    def run_dir(self) -> Path:
        """Sockets and runtime state (short paths: unix sockets are limited to 107 bytes)."""
        return RECORDS / self.id

    def save(self) -> None:
        """Write the record (atomically: a sweeper reads only complete records)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "record.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.rename(self.run_dir / "record.json")


@dataclass
class Node:
    """Handle on a running node: its name, its bridge address (what pods reach the host at)."""

    record: Record
    binary: Path
    host_ip: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The Node object's name."""
        return self.record.name

    @property
    def state_dir(self) -> Path:
        """Logs, configuration, the containerd root and the kubelet root dir."""
        return Path(self.record.state_dir)

    @property
    def containerd_socket(self) -> Path:
        """containerd's gRPC socket (for ``ctr``)."""
        return self.record.run_dir / "containerd.sock"

    def log_tail(self, component: str, lines: int = 60) -> str:
        """Last ``lines`` lines of a component's log."""
        path = self.state_dir / "logs" / f"{component}.log"
        if not path.exists():
            return f"(no log at {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)

    def ctr(self, *args: str) -> str:
        """``ctr`` against this node's containerd, in the CRI namespace."""
        return _check(["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args])

    def import_image(self, image: BuiltImage, *aliases: str) -> None:
        """Import a docker-archive into the node and tag it with ``aliases`` too (a pod's
        ``nocturne-runner:e2e`` is ``docker.io/library/nocturne-runner:e2e`` to the runtime)."""
        self.ctr("images", "import", str(image.archive))
        for alias in aliases:
            self.ctr("images", "tag", "--force", image.reference, normalized(alias))

    @contextmanager
    def relay(self, port: int) -> Iterator[str]:
        """Serve the loopback ``port`` of a test's server (a model, a web page) to pods, at the
        bridge address: socat relays each connection. Yields ``host:port`` for the pods."""
        [outer] = free_ports(1)
        listen = f"TCP-LISTEN:{outer},bind={self.host_ip},fork,reuseaddr"
        # argv[0] names the node's state dir, so a clean-up after a crash finds the relay too.
        argv0 = f"socat-relay {self.state_dir}"
        script = f'exec -a "$0" socat {listen} TCP:127.0.0.1:{port}'
        proc = subprocess.Popen(
            ["bash", "-c", script, argv0],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 10
            while not _accepts(self.host_ip, outer):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise NodeError(f"socat relay {self.host_ip}:{outer} -> :{port} did not start")
                time.sleep(0.05)
            yield f"{self.host_ip}:{outer}"
        finally:
            terminate(proc, 5)

    def container_pid(self, container_id: str) -> int | None:
        """The host pid of a running container's main process (``containerd://<id>`` from a
        pod's status), None when it runs no more."""
        task = container_id.removeprefix("containerd://")
        pid_file = self.record.run_dir / "containerd" / _TASKS / task / "init.pid"
        try:
            return int(pid_file.read_text())
        except (OSError, ValueError):
            return None

    def detach(self) -> None:
        """Leave the node running after this process exits (``make demo``): containerd becomes
        its owner, so the sweep leaves it alone while containerd lives; ``stop_detached``
        ends it."""
        self.record.owner_pid = self.processes["containerd"].pid
        self.record.save()
        self.processes.clear()

    def stop(self) -> None:
        """Stop every process of the node and remove all it made; idempotent."""
        for name in ("kube-scheduler", "kubelet"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                terminate(proc, 15)
        _kill_containers(self.record)
        proc = self.processes.pop("containerd", None)
        if proc is not None:
            terminate(proc, 15)
        clean_up(self.record)


def pod_network() -> dict[str, str]:
    """The namespace label that keeps a namespace's pods on the node's bridge (off the host
    network, where HOST_NETWORK_POLICY puts every other namespace's pods)."""
    return {HOST_NETWORK_LABEL: "pod"}


def running_at(state_dir: Path) -> bool:
    """True when a node whose state is in ``state_dir`` runs (its owner lives)."""
    return any(Path(r.state_dir) == state_dir and alive(r.owner_pid) for r in records())


def stop_detached(state_dir: Path) -> bool:
    """Stop a node left running by ``detach`` (found by its state dir); False if there is none."""
    for record in records():
        if Path(record.state_dir) == state_dir:
            _kill_containers(record)
            clean_up(record)
            return True
    return False


def normalized(reference: str) -> str:
    """An image reference as the runtime names it (Docker Hub's implicit host and library/)."""
    first = reference.split("/", 1)[0]
    if "/" not in reference or ("." not in first and ":" not in first and first != "localhost"):
        reference = f"docker.io/{reference if '/' in reference else 'library/' + reference}"
    return reference


def start(
    cp: ControlPlane,
    state_dir: Path,
    pause: BuiltImage,
    *,
    name: str = NODE_NAME,
    private: bool = False,
    log: Callable[[str], None] = print,
) -> Node:
    """Start containerd, the kubelet and kube-scheduler against ``cp``; return once the node is
    Ready. On any failure everything started so far is removed. ``private``: a second node of
    one test, with no scheduler (one per cluster) and a taint nothing tolerates: only pods that
    name it in ``nodeName`` run there."""
    sweep()
    record = Record(secrets.token_hex(4), os.getpid(), str(state_dir), name, private)
    node = Node(record, cp.binary, "")
    started = time.monotonic()
    try:
        _start(node, cp, pause, started, log)
    except BaseException:
        node.stop()
        raise
    return node


def _start(
    node: Node,
    cp: ControlPlane,
    pause: BuiltImage,
    started: float,
    log: Callable[[str], None],
) -> None:
    record = node.record
    state = node.state_dir
    for sub in ("logs", "kubelet", "pod-logs", "cni/net.d", "cni/ipam", "sysctl", "plugins"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    record.save()
    node.host_ip = _make_bridge(record)
    _make_cgroup_root(record)
    log(f"[node] bridge {record.bridge} {record.subnet}, cgroup /{record.cgroup}")

    _write_cni(record, node.host_ip)
    default_hosts = state / "registries" / "_default" / "hosts.toml"
    default_hosts.parent.mkdir(parents=True, exist_ok=True)
    default_hosts.write_text('server = "http://127.0.0.1:9"\n')
    containerd_config = state / "containerd.toml"
    containerd_config.write_text(_containerd_toml(record, pause.reference))
    node.processes["containerd"] = _spawn(
        state, "containerd", ["containerd", f"--config={containerd_config}"]
    )
    _wait(node, "containerd", lambda: _ctr_answers(node), 30)
    node.import_image(pause)
    log(f"[node] containerd ready, pause image imported ({time.monotonic() - started:.1f} s)")

    _apply_host_network_policy(cp)
    kubelet_args = _kubelet_setup(node, cp)
    node.processes["kubelet"] = _spawn(state, "kubelet", kubelet_args)
    if not node.record.private:
        # The scheduler's own copy of the admin kubeconfig: its command line names the node's
        # state dir, so a clean-up after a crash finds it (_owned_pids).
        scheduler_kubeconfig = state / "scheduler.kubeconfig"
        shutil.copyfile(cp.kubeconfig, scheduler_kubeconfig)
        node.processes["kube-scheduler"] = _spawn(
            state,
            "kube-scheduler",
            [
                str(node.binary),
                "kube-scheduler",
                f"--kubeconfig={scheduler_kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--v=1",
            ],
        )
    kubelet_started = time.monotonic()
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        _wait(node, "kubelet", lambda: _node_ready(api, node.name), 90)
    finally:
        api.close()
    log(
        f"[node] {node.name} Ready {time.monotonic() - kubelet_started:.1f} s after the kubelet "
        f"started ({time.monotonic() - started:.1f} s in all)"
    )


# --- host resources -----------------------------------------------------------------------


def _make_bridge(record: Record) -> str:
    """Create this node's bridge on a /24 no other bridge holds; return its address."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    with (RECORDS / "subnets.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken = {
            ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(_check(["ip", "-j", "addr", "show"]))
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        }
        subnet = next(
            (
                net
                for net in _SUBNETS.subnets(new_prefix=24)
                if net.network_address.packed[2] != 0
                and not any(net.overlaps(other) for other in taken)
            ),
            None,
        )
        if subnet is None:
            raise NodeError(f"no free /24 in {_SUBNETS} for a node bridge")
        record.bridge, record.subnet = f"nct{record.id}", str(subnet)
        record.save()
        host_ip = str(subnet.network_address + 1)
        _check(["ip", "link", "add", record.bridge, "type", "bridge"])
        _check(["ip", "addr", "add", f"{host_ip}/24", "dev", record.bridge])
        _check(["ip", "link", "set", record.bridge, "up"])
    return host_ip


def _cgroup_hierarchies() -> list[Path]:
    return sorted(p for p in _CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())


def _make_cgroup_root(record: Record) -> None:
    """The kubelet's ``cgroupRoot``, in every hierarchy (it must exist before the kubelet)."""
    record.cgroup = f"nocturne-{record.id}"
    record.save()
    for hierarchy in _cgroup_hierarchies():
        path = hierarchy / record.cgroup
        path.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            # A new cpuset starts empty; children inherit nothing from an empty parent.
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((hierarchy / name).read_text())


def _write_cni(record: Record, host_ip: str) -> None:
    conflist = {
        "cniVersion": "0.4.0",
        "name": f"nocturne-{record.id}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": record.bridge,
                # The bridge and its address exist already; as gateway the plugin would turn on
                # the host's ip_forward. No ipMasq: no firewall rule. No routes: no way out.
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": record.subnet, "gateway": host_ip}]],
                    "dataDir": str(Path(record.state_dir) / "cni" / "ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }
    path = Path(record.state_dir) / "cni" / "net.d" / "10-nocturne.conflist"
    path.write_text(json.dumps(conflist, indent=2))


def _containerd_toml(record: Record, sandbox_image: str) -> str:
    run, state = record.run_dir, Path(record.state_dir)
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{state / "containerd"}"
state = "{run / "containerd"}"
oom_score = 0
# Plugins that would only log errors here (no btrfs, zfs, devmapper, aufs on these machines).
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.opt"]

[grpc]
  address = "{run / "containerd.sock"}"
[ttrpc]
  address = "{run / "containerd.sock.ttrpc"}"
[debug]
  address = ""
[metrics]
  address = ""

[{cri}]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Lowering oom_score_adj (the sandbox's -998) needs CAP_SYS_RESOURCE, which these machines
  # do not grant: clamp every container's to containerd's own.
  restrict_oom_score_adj = true
  # The pods' network namespaces live under this node's state, not in the host's /run/netns.
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{run / "runc"}"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state / "cni" / "net.d"}"
    max_conf_num = 1
"""


def _kubelet_setup(node: Node, cp: ControlPlane) -> list[str]:
    """Certificates, kubeconfig and configuration of the kubelet; returns its command line."""
    record, state = node.record, node.state_dir
    pki_dir = state / "pki"
    pki_dir.mkdir(exist_ok=True)
    serving = issue_certificate(cp.pki, pki_dir / "kubelet", node.name, server_ips=(node.host_ip,))
    client_cert, client_key = issue_certificate(
        cp.pki, pki_dir / "node", f"system:node:{node.name}", ("system:nodes",)
    )
    _bind_node_role(cp, node.name)
    kubeconfig = state / "kubelet.kubeconfig"
    cp_config = yaml.safe_load(cp.kubeconfig.read_text())
    cp_config["users"][0]["user"] = {
        "client-certificate": str(client_cert),
        "client-key": str(client_key),
    }
    kubeconfig.write_text(yaml.safe_dump(cp_config))
    port, healthz_port = free_ports(2)
    kubelet_config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # These machines run the cgroup v1 (hybrid) hierarchy, which 1.35 refuses by default.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{record.cgroup}",
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "oomScoreAdj": 0,
        "address": node.host_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        # Only holders of a cluster-CA certificate (the apiserver) may talk to it at all.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(cp.pki.ca_cert)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "podLogsDir": str(state / "pod-logs"),
        "volumePluginDir": str(state / "plugins"),
        # No cluster DNS and no host resolver: a pod's name lookup cannot leave the machine.
        "clusterDNS": [],
        "resolvConf": "",
        # A shared disk and memory: this node never evicts and never collects images.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "0%",
            "nodefs.inodesFree": "0%",
            "imagefs.available": "0%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "24h",
        "serializeImagePulls": False,
        "enableControllerAttachDetach": False,
        "syncFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
        "maxPods": 250,
        "registerWithTaints": (
            [{"key": PRIVATE_TAINT, "effect": "NoSchedule"}] if record.private else []
        ),
        "enableServer": True,
        "shutdownGracePeriod": "0s",
    }
    config_path = state / "kubelet.yaml"
    config_path.write_text(yaml.safe_dump(kubelet_config))
    # The kubelet's root dir is a shared mount, so the volumes it mounts there from its own
    # mount namespace appear in the host's, where containerd's runc bind-mounts them.
    root_dir = state / "kubelet"
    _check(["mount", "--bind", str(root_dir), str(root_dir)])
    _check(["mount", "--make-shared", str(root_dir)])
    binds = []
    for name in _KUBELET_SYSCTLS:
        copy = state / "sysctl" / name.replace("/", ".")
        copy.write_text((Path("/proc/sys") / name).read_text())
        binds.append(f"mount --bind {shlex.quote(str(copy))} /proc/sys/{name}")
    kubelet = [
        str(node.binary),
        "kubelet",
        f"--config={config_path}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={root_dir}",
        f"--cert-dir={pki_dir}",
        f"--hostname-override={node.name}",
        f"--node-ip={node.host_ip}",
        "--v=1",
    ]
    script = " && ".join([*binds, "exec " + shlex.join(kubelet)])
    # /proc is private on the host, so the binds above stay in the kubelet's namespace.
    return ["unshare", "--mount", "--propagation=unchanged", "--", "sh", "-c", script]


HOST_NETWORK_LABEL = "nocturne.test/network"
# Pods share the host's network, as they did under the old pod executor, unless their namespace
# is labelled nocturne.test/network=pod: the suite's servers (PostgreSQL, models, pages, the
# operators' run APIs) listen on loopback. The apiserver is on loopback too (no kube-proxy for the
# `kubernetes` Service): in-cluster clients get its address. Host ports equal container ports
# (the apiserver validates that for host-network pods), and images are never pulled: they are
# imported.
HOST_NETWORK_POLICY = """
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicy
metadata: {name: nocturne-test-host-network}
spec:
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}
    namespaceSelector:
      matchExpressions:
      - {key: "@LABEL@", operator: NotIn, values: [pod]}
  failurePolicy: Fail
  reinvocationPolicy: Never
  mutations:
  - patchType: ApplyConfiguration
    applyConfiguration:
      expression: >
        Object{spec: Object.spec{
          hostNetwork: true,
          containers: object.spec.containers.map(c, Object.spec.containers{
            name: c.name,
            imagePullPolicy: "Never",
            env: [
              Object.spec.containers.env{name: "KUBERNETES_SERVICE_HOST", value: "127.0.0.1"},
              Object.spec.containers.env{name: "KUBERNETES_SERVICE_PORT", value: "@API_PORT@"}
            ],
            ports: (has(c.ports) ? c.ports : []).map(p, Object.spec.containers.ports{
              containerPort: p.containerPort, hostPort: p.containerPort})
          })
        }}
---
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicyBinding
metadata: {name: nocturne-test-host-network}
spec:
  policyName: nocturne-test-host-network
"""


def _apply_host_network_policy(cp: ControlPlane) -> None:
    policy = HOST_NETWORK_POLICY.replace("@LABEL@", HOST_NETWORK_LABEL)
    policy = policy.replace("@API_PORT@", str(cp.api_port))
    kubectl = tools.ensure().kubectl
    result = subprocess.run(
        [str(kubectl), f"--kubeconfig={cp.kubeconfig}", "apply", "-f", "-"],
        input=policy,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise NodeError(f"applying the host-network policy failed: {result.stderr}")


def _bind_node_role(cp: ControlPlane, name: str) -> None:
    """The node's credentials get ``system:node`` (the harness runs RBAC alone, no Node
    authorizer)."""
    api = config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        binding = client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=f"nocturne-node-{name}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="system:node"
            ),
            subjects=[
                client.RbacV1Subject(
                    api_group="rbac.authorization.k8s.io",
                    kind="User",
                    name=f"system:node:{name}",
                )
            ],
        )
        with suppress(client.ApiException):
            client.RbacAuthorizationV1Api(api).create_cluster_role_binding(binding)
    finally:
        api.close()


# --- processes ----------------------------------------------------------------------------


def _spawn(state: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    with (state / "logs" / f"{name}.log").open("ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait(node: Node, name: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for component, proc in node.processes.items():
            if proc.poll() is not None:
                raise NodeError(
                    f"{component} exited with code {proc.returncode} during start-up\n"
                    f"{node.log_tail(component)}"
                )
        if ready():
            return
        time.sleep(0.2)
    raise NodeError(f"{name} not ready after {timeout:.0f} s\n{node.log_tail(name)}")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ctr_answers(node: Node) -> bool:
    if not node.containerd_socket.exists():
        return False
    try:
        node.ctr("version")
    except NodeError:
        return False
    return True


def _node_ready(api: client.ApiClient, name: str) -> bool:
    try:
        found = client.CoreV1Api(api).read_node(name)
    except client.ApiException:
        return False
    status, spec = found.status, found.spec
    conditions = {c.type: c.status for c in ((status and status.conditions) or [])}
    taints = [t for t in ((spec and spec.taints) or []) if t.key != PRIVATE_TAINT]
    return conditions.get("Ready") == "True" and not taints


def _check(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed (exit {result.returncode}): {result.stderr}")
    return result.stdout


# --- clean-up -----------------------------------------------------------------------------


def _kill_containers(record: Record) -> None:
    """Kill and delete every container of the node's containerd while it still runs."""
    socket = record.run_dir / "containerd.sock"
    if not socket.exists():
        return
    ctr = ["ctr", f"--address={socket}", "--namespace=k8s.io"]
    with suppress(NodeError):
        for task in _check([*ctr, "tasks", "ls", "-q"]).split():
            subprocess.run(
                [*ctr, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, check=False
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tasks = _check([*ctr, "tasks", "ls", "-q"]).split()
            for task in tasks:
                subprocess.run(
                    [*ctr, "tasks", "delete", "-f", task], capture_output=True, check=False
                )
            if not tasks:
                break
            time.sleep(0.2)
        containers = _check([*ctr, "containers", "ls", "-q"]).split()
        if containers:
            subprocess.run(
                [*ctr, "containers", "rm", *containers], capture_output=True, check=False
            )


def _owned_pids(record: Record) -> list[int]:
    """Processes of this node still alive: whatever names its run dir or state dir on its
    command line (containerd, its shims, the kubelet, ...) and whatever runs in its cgroups
    (containers whose shim is gone)."""
    marks = (str(record.run_dir), record.state_dir)
    found = []
    if record.cgroup:
        for hierarchy in _cgroup_hierarchies():
            for procs in (hierarchy / record.cgroup).rglob("cgroup.procs"):
                with suppress(OSError, ValueError):
                    found += [int(pid) for pid in procs.read_text().split()]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(mark in argv for mark in marks) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return sorted(set(found) - {os.getpid()})


def _mounts_under(*roots: str) -> list[str]:
    """Mount points under ``roots`` in this mount namespace, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def clean_up(record: Record) -> None:
    """Remove everything ``record`` lists: processes, mounts, bridge, cgroups, directories."""
    for _ in range(3):
        pids = _owned_pids(record)
        if not pids:
            break
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
    for point in _mounts_under(str(record.run_dir), record.state_dir):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    if record.bridge:
        subprocess.run(["ip", "link", "del", record.bridge], capture_output=True, check=False)
    if record.cgroup:
        for hierarchy in _cgroup_hierarchies():
            _remove_cgroup(hierarchy / record.cgroup)
    for sub in ("containerd", "kubelet"):
        shutil.rmtree(Path(record.state_dir) / sub, ignore_errors=True)
    shutil.rmtree(record.run_dir, ignore_errors=True)


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir_cgroup(child)
    _rmdir_cgroup(path)


def _rmdir_cgroup(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
        except FileNotFoundError:
            return
        except OSError:  # busy until the last process in it has gone
            time.sleep(0.1)
        else:
            return


def records() -> Iterator[Record]:
    """Every node record on this machine."""
    if not RECORDS.is_dir():
        return
    for path in RECORDS.glob("*/record.json"):
        with suppress(OSError, ValueError, TypeError):
            yield Record(**json.loads(path.read_text()))


def sweep() -> list[str]:
    """Remove the nodes whose owning process is gone (a run killed before its clean-up)."""
    removed = []
    for record in records():
        if not alive(record.owner_pid):
            clean_up(record)
            removed.append(record.id)
    return removed


def snapshot_host() -> Mapping[str, object]:
    """What a node must leave as it found it: links, mounts, cgroups, netns, sysctls."""
    links = sorted(link["ifname"] for link in json.loads(_check(["ip", "-j", "link", "show"])))
    mounts = sorted(
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    cgroups = sorted(str(p) for h in _cgroup_hierarchies() for p in h.iterdir() if p.is_dir())
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    sysctls = {
        name: (Path("/proc/sys") / name).read_text().strip()
        for name in (*_KUBELET_SYSCTLS, "net/ipv4/ip_forward")
    }
    return {"links": links, "mounts": mounts, "cgroups": cgroups, "netns": netns, **sysctls}
