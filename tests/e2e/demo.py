"""``make demo``: a local control plane with a real node (kubelet, containerd, the project's images
built from its Dockerfiles) and the Nocturne operator, the example schedules applied and one run
started in a real container. ``make demo-down`` stops everything.

Everything runs detached; pids live in ``<dir>/demo.json``, logs in ``<dir>/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from e2e.schedules import run_cli
from harness import build, controlplane, images, tools
from harness import node as real_node
from harness.kube import Kubectl, healthy, wait_for
from harness.postgres import start_postgres, stop_postgres
from nocturne_operator.storage import upgrade

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
NAMESPACE = "demo"
RUNNER_IMAGE = "nocturne-runner:dev"


def say(message: str) -> None:
    """Progress for people."""
    print(f"[demo] {message}", flush=True)


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            env=env,
            cwd="/",
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def up(state: Path) -> int:
    """Start (or reuse) everything and print how to explore it."""
    started = time.monotonic()
    say("building or reusing kube-local (the first build takes ~9 min)")
    build.ensure()
    if not controlplane.is_up(state):
        down(state)
        controlplane.main(["up", "--dir", str(state)])
    kubeconfig = state / "admin.kubeconfig"
    kubectl = Kubectl(tools.ensure().kubectl, kubeconfig)
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "PYTHONPATH": str(REPO / "tests"),
        "KUBECONFIG": str(kubeconfig),
    }
    pids = _read_pids(state)
    database = state / "database.json"
    if not database.exists():
        server = start_postgres()
        upgrade(server.url)
        # Local demo state only (0600, under .nocturne/): the URL holds the demo's password.
        database.write_text(json.dumps({"url": server.url, "dataDir": str(server.data_dir)}))
        database.chmod(0o600)
        say("PostgreSQL running, history schema migrated")
    db_url = json.loads(database.read_text())["url"]
    env["NOCTURNE_DATABASE_URL"] = db_url
    if not real_node.running_at(state / "node"):
        _start_node(state)
    kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/agentschedules.nocturne.dev"
    )
    if not controlplane.alive(pids.get("operator", 0)):
        port, run_api_port = controlplane.free_ports(2)
        pids["operator"] = _spawn(
            [sys.executable, "-m", "nocturne_operator"],
            state / "logs" / "operator.log",
            {
                **env,
                "NOCTURNE_HEALTH_ENDPOINT": f"http://127.0.0.1:{port}/healthz",
                "NOCTURNE_RUNNER_IMAGE": RUNNER_IMAGE,
                # Runner pods share the host network (harness.node): the run API on loopback,
                # its CA in a Secret of `default`.
                "NOCTURNE_RUN_API_PORT": str(run_api_port),
                "NOCTURNE_RUN_API_BIND": "127.0.0.1",
                "NOCTURNE_RUN_API_URL": f"https://127.0.0.1:{run_api_port}",
                "NOCTURNE_RUN_API_TLS_NAMESPACE": "default",
            },
        )
        wait_for(lambda: healthy(port), 60, "the operator")
        say("operator running")
    _write_pids(state, pids)
    if not kubectl("get", "namespace", NAMESPACE, check=False):
        kubectl("create", "namespace", NAMESPACE)
    # No database Secret here: runner pods report through the operator's run API.
    kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES))
    for name in ("daily-ai-news", "competitor-monitor", "weekly-summary"):
        wait_for(partial(_is_active, kubectl, name), 60, f"{name} to become Active")
    kubectl(
        "annotate",
        "--overwrite",
        "-n",
        NAMESPACE,
        "asched/daily-ai-news",
        f"nocturne.dev/run-now=demo-{int(time.time())}",
    )
    wait_for(partial(_last_result, kubectl), 90, "the first run to finish")
    say(f"ready in {time.monotonic() - started:.0f} s; the schedules:")
    print(kubectl("get", "asched", "-n", NAMESPACE))
    print(kubectl("get", "cronjobs,jobs", "-n", NAMESPACE))
    say(f"what it found (nocturne show daily-ai-news -n {NAMESPACE}):")
    show = run_cli(kubeconfig, "show", "daily-ai-news", "-n", NAMESPACE, database_url=db_url)
    print(show.stdout if show.returncode == 0 else show.stdout + show.stderr)
    bin_dir = tools.ensure().bin_dir
    print(
        "Explore:\n"
        f"  export KUBECONFIG={kubeconfig}\n"
        f"  export PATH={bin_dir}:$PATH                    # pinned kubectl and helm\n"
        f"  kubectl get asched -n {NAMESPACE} -o yaml\n"
        f"  kubectl describe asched daily-ai-news -n {NAMESPACE}\n"
        f"  .venv/bin/nocturne next-runs docs/examples/weekly-summary.yaml --count 5\n"
        "  export NOCTURNE_DATABASE_URL=$(python3 -c 'import json,sys; "
        f'print(json.load(open(sys.argv[1]))["url"])\' {database})\n'
        f"  .venv/bin/nocturne history daily-ai-news -n {NAMESPACE}\n"
        f"  .venv/bin/nocturne show daily-ai-news -n {NAMESPACE}            # the newest run\n"
        f"  .venv/bin/nocturne describe daily-ai-news -n {NAMESPACE}\n"
        f"  .venv/bin/nocturne pause daily-ai-news -n {NAMESPACE} --reason 'trying it out'\n"
        f"Logs: {state / 'logs'}\n"
        "Stop: make demo-down"
    )
    return 0


def _start_node(state: Path) -> None:
    """Build or reuse the images, start a real node beside the control plane, leave it running."""
    step = time.monotonic()
    say("building or reusing the images (podman; the first build takes ~3 min)")
    built = images.ensure_all(log=print)
    say(f"images ready in {time.monotonic() - step:.0f} s")
    node = real_node.start(controlplane.attached(state), state / "node", built["pause"], log=print)
    step = time.monotonic()
    node.import_image(built["nocturne-runner"], RUNNER_IMAGE)
    node.import_image(built["nocturne-operator"], "nocturne-operator:dev")
    node.detach()
    say(f"real node {node.name} Ready, images imported in {time.monotonic() - step:.0f} s")


def down(state: Path) -> int:
    """Stop the operator, the node and the control plane."""
    pids = _read_pids(state)
    pid = pids.get("operator")
    if pid:
        controlplane.stop_group(pid, timeout=30)
    real_node.stop_detached(state / "node")
    (state / "demo.json").unlink(missing_ok=True)
    database = state / "database.json"
    if database.exists():
        stop_postgres(Path(json.loads(database.read_text())["dataDir"]))
        database.unlink()
    stopped = controlplane.down(state)
    say("stopped" if stopped or pids else "nothing was running")
    return 0


def _last_result(kubectl: Kubectl) -> str:
    return kubectl(
        "get",
        "asched",
        "daily-ai-news",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.status.lastRun.result}",
        check=False,
    )


def _is_active(kubectl: Kubectl, name: str) -> bool:
    phase = kubectl(
        "get", "asched", name, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
    )
    return phase == "Active"


def _read_pids(state: Path) -> dict[str, int]:
    path = state / "demo.json"
    data: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    return data


def _write_pids(state: Path, pids: dict[str, int]) -> None:
    (state / "demo.json").write_text(json.dumps(pids))


def main(argv: list[str] | None = None) -> int:
    """CLI: up | down."""
    parser = argparse.ArgumentParser(prog="python -m e2e.demo")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=REPO / ".nocturne" / "cluster")
    args = parser.parse_args(argv)
    state: Path = args.dir.resolve()
    return up(state) if args.command == "up" else down(state)


if __name__ == "__main__":
    sys.exit(main())
