"""The real node (harness.node) on the real control plane: a pod from a project image runs under
the kubelet with what runc enforces, and the node leaves the host as it found it, after a clean
stop and after its owner was killed (the next start's sweep)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from harness import images, node
from harness.kube import Cluster, Kubectl, wait_for

pytestmark = pytest.mark.e2e

_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops")


def _sysctls() -> dict[str, str]:
    names = (*_SYSCTLS, "net/ipv4/ip_forward")
    return {n: (Path("/proc/sys") / n).read_text().strip() for n in names}


def _leftovers(record: node.Record) -> list[str]:
    """What of ``record`` is still on the host."""
    found = []
    shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    links = shown.stdout
    if record.bridge and f" {record.bridge}:" in links:
        found.append(f"link {record.bridge}")
    found += [f"mount {m}" for m in node._mounts_under(str(record.run_dir), record.state_dir)]
    found += [f"pid {p}" for p in node._owned_pids(record)]
    if record.cgroup:
        found += [
            f"cgroup {h / record.cgroup}"
            for h in node._cgroup_hierarchies()
            if (h / record.cgroup).exists()
        ]
    if record.run_dir.exists():
        found.append(f"dir {record.run_dir}")
    return found


@pytest.fixture
def pause() -> images.BuiltImage:
    missing = images.missing_tools()
    if missing or os.geteuid() != 0:
        pytest.skip(f"a node needs root and {missing}")
    return images.ensure_pause()


def test_a_pod_runs_and_the_node_leaves_nothing_behind(
    cluster: Cluster, kubectl: Kubectl, pause: images.BuiltImage, tmp_path: Path
) -> None:
    assert cluster.local is not None
    before = _sysctls()
    started = node.start(cluster.local, tmp_path / "node", pause, name="private-a", private=True)
    record = started.record
    try:
        # The kubelet wrote its sysctls into files of its own mount namespace, not the host's.
        assert _sysctls() == before
        started.import_image(images.ensure(images.IMAGES[1]), "nocturne-runner:node-test")
        script = (
            "import os; print('uid', os.getuid()); "
            "open('/dev/termination-log', 'w').write('bye'); "
            "open('/x', 'w')"
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe", "namespace": "default"},
            "spec": {
                "nodeName": started.name,
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                "containers": [
                    {
                        "name": "c",
                        "image": "nocturne-runner:node-test",
                        "command": ["python", "-c", script],
                        "securityContext": {
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        kubectl("apply", "-f", "-", stdin=json.dumps(pod))
        try:
            done = wait_for(
                lambda: (
                    (p := kubectl.json("pod", "probe", "-n", "default"))["status"].get("phase")
                    in ("Succeeded", "Failed")
                    and p
                ),
                60,
                "the probe pod to end",
            )
            terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
            # Written as 65532; then the write to the read-only root failed (exit 1).
            assert (terminated["exitCode"], terminated["message"]) == (1, "bye"), terminated
            logs = kubectl("logs", "probe", "-n", "default")
            assert "uid 65532" in logs
            assert "Read-only file system" in logs
        finally:
            kubectl("delete", "pod", "probe", "-n", "default", "--wait=false", check=False)
    finally:
        started.stop()
    assert _leftovers(record) == []
    assert _sysctls() == before
    kubectl("delete", "node", started.name, check=False)


_CHILD = """
import json, sys, time
from pathlib import Path
from harness import controlplane, images, node, pki
args = json.loads(sys.argv[1])
paths = pki.Pki(**{k: Path(v) for k, v in args["pki"].items()})
cp = controlplane.ControlPlane(
    Path(args["state"]), Path(args["binary"]), paths, 0, args["api_port"], Path(args["kubeconfig"])
)
started = node.start(
    cp, Path(args["dir"]), images.ensure_pause(), name="private-b", private=True, log=lambda _: None
)
print(json.dumps(started.record.__dict__), flush=True)
time.sleep(600)
"""


def test_a_node_whose_owner_was_killed_is_swept_by_the_next_start(
    cluster: Cluster, kubectl: Kubectl, pause: images.BuiltImage, tmp_path: Path
) -> None:
    cp = cluster.local
    assert cp is not None
    args = {
        "state": str(cp.state_dir),
        "binary": str(cp.binary),
        "pki": {k: str(v) for k, v in asdict(cp.pki).items()},
        "api_port": cp.api_port,
        "kubeconfig": str(cp.kubeconfig),
        "dir": str(tmp_path / "node"),
    }
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child's node did not start"
        record = node.Record(**json.loads(line))
        assert _leftovers(record), "the node should be running"
    finally:
        # No clean-up of its own: the owner dies at once.
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    time.sleep(0.5)
    assert _leftovers(record), "killed without clean-up, its node is still there"
    assert record.id in node.sweep()
    assert _leftovers(record) == []
    kubectl("delete", "node", "private-b", check=False)
