"""Build (or reuse) ``kube-local``, the busybox of upstream etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kubelet that the end-to-end tests run.

The binary is cached outside the repository, keyed by the content hash of the Go module, the Go
version and the link flags, so a warm run costs nothing. Run ``python -m harness.build``
to build ahead of the tests; it prints progress and timing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent / "kube-local"
_VERSION_PACKAGES = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")


class BuildError(RuntimeError):
    """The Go toolchain is missing or the build failed."""


def cache_root() -> Path:
    """Where built binaries live: ``$XDG_CACHE_HOME/nocturne/kube-local`` (never in the repo)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nocturne" / "kube-local"


def kubernetes_version() -> str:
    """The ``k8s.io/kubernetes`` version pinned in go.mod, e.g. ``v1.35.4``."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)\s*$", _read("go.mod"), re.M)
    if match is None:
        raise BuildError(f"{MODULE_DIR / 'go.mod'}: no k8s.io/kubernetes requirement")
    return match.group(1)


def ldflags() -> str:
    """Link flags that stamp the real version, so the server does not report v0.0.0-master."""
    version = kubernetes_version()
    major, minor = version[1:].split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in _VERSION_PACKAGES:
        flags += [
            f"-X '{pkg}.gitVersion={version}'",
            f"-X '{pkg}.gitMajor={major}'",
            f"-X '{pkg}.gitMinor={minor}'",
            f"-X '{pkg}.gitTreeState=clean'",
        ]
    return " ".join(flags)


def go_binary() -> str | None:
    """Path of the ``go`` tool, or None when Go is not installed."""
    return shutil.which("go")


def cache_key(go: str) -> str:
    """Content hash of everything that determines the binary."""
    go_version = subprocess.run(
        [go, "version"], check=True, capture_output=True, text=True, env=_go_env()
    ).stdout
    digest = hashlib.sha256()
    for part in (_read("go.mod"), _read("go.sum"), _read("main.go"), go_version, ldflags()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def ensure(*, quiet: bool = False) -> Path:
    """Return the path of a built ``kube-local``, building it first if the cache has none."""
    go = go_binary()
    if go is None:
        raise BuildError("the Go toolchain ('go') is not on PATH; it is needed to build kube-local")
    target_dir = cache_root() / cache_key(go)
    target = target_dir / "kube-local"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        # Two pytest processes must never build at once; the second reuses the first's result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(go, target, quiet=quiet)
    return target


def _build(go: str, target: Path, *, quiet: bool) -> None:
    def say(msg: str) -> None:
        if not quiet:
            print(f"[kube-local] {msg}", flush=True)

    say(
        f"building {kubernetes_version()} from {MODULE_DIR} -> {target} "
        "(cold: ~9 min on 2 cores plus module download; cached afterwards)"
    )
    tmp = target.with_suffix(".tmp")
    cmd = [go, "build", "-v", "-trimpath", "-ldflags", ldflags(), "-o", str(tmp), "."]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=MODULE_DIR,
        env=_go_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    packages = 0
    tail: list[str] = []
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(30):
            say(f"... {time.monotonic() - started:5.0f} s, {packages} packages compiled")

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        for line in proc.stdout:
            packages += 1
            tail = [*tail[-40:], line.rstrip()]
        rc = proc.wait()
    finally:
        stop.set()
        beat.join()
    elapsed = time.monotonic() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"go build failed (exit {rc}) after {elapsed:.0f} s:\n" + "\n".join(tail))
    tmp.rename(target)
    size_mib = target.stat().st_size / 2**20
    say(
        f"built in {elapsed:.0f} s ({packages} packages, binary {size_mib:.0f} MiB, "
        f"peak RSS of one child {peak_mib:.0f} MiB)"
    )


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # A wrong `go` line must fail fast instead of downloading a toolchain; the committed go.sum
    # pins every module, so the build needs no go.mod rewrite.
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=readonly")
    return env


def _read(name: str) -> str:
    return (MODULE_DIR / name).read_text()


def main() -> int:
    """CLI: build or reuse the binary and print its path."""
    try:
        path = ensure()
    except BuildError as exc:
        print(f"[kube-local] {exc}", file=sys.stderr)
        return 1
    print(f"[kube-local] {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
