"""The executor's command line: ``python -m harness.executor --kubeconfig K --state-dir D``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from harness.executor.api import KubeApi
from harness.executor.images import ImageTable
from harness.executor.kubelet import Executor

log = logging.getLogger("nocturne.executor")


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # urllib3 warns on every broken watch; our own lines already say what happened.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 after a clean SIGTERM/SIGINT)."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.executor",
        description="Run unbound pods of a local control plane as bubblewrap-sandboxed processes.",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True, help="admin kubeconfig")
    parser.add_argument("--state-dir", type=Path, required=True, help="logs and pod files")
    parser.add_argument("--images", type=Path, help="JSON image table (extends the defaults)")
    parser.add_argument("--ready-file", type=Path, help="written once the first list is done")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(state_dir / "executor.log")

    def fail(message: str) -> int:
        log.error("%s", message)
        print(f"executor: {message}", file=sys.stderr)
        return 2

    try:
        images = ImageTable.load(args.images)
    except (OSError, ValueError, TypeError) as exc:
        return fail(f"cannot load the image table: {exc}")
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if bwrap is None or setpriv is None:
        return fail("needs bwrap (Debian package bubblewrap) and setpriv (util-linux) on PATH")
    if os.geteuid() != 0:
        return fail("must run as root: it switches each container to the pod's uid (setpriv)")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    api = KubeApi(args.kubeconfig)
    executor = Executor(api, state_dir, images, bwrap=bwrap, setpriv=setpriv)
    log.info("executor pid %d: apiserver %s, %s", os.getpid(), api.server, images.source)
    executor.start()
    while not stop.is_set() and not executor.synced.wait(0.2):
        pass
    if executor.synced.is_set() and args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(args.ready_file)
        log.info("ready")
    while not stop.wait(1.0):
        pass
    executor.shutdown()
    api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
