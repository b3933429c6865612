"""Go tools the tests run, built from the Go module proxy: Prometheus's ``promtool``, a small
``promql-names`` over Prometheus's PromQL parser, and ``actionlint``.

Each tool's module under ``tests/harness/gotools/<module>/`` pins every dependency in its
committed go.mod and go.sum (promtool and actionlint through go.mod's ``tool`` directive), so a
build needs nothing but the module proxy and rewrites nothing. Binaries are cached outside the
repository by the content hash of that module, the Go version and the build flags, as
``build.py`` caches kube-local: a warm run costs one hash. Kept apart from ``build.py`` because
those tools are upstream mains built as they are, several to a module, not one main of ours with
version stamps. Run ``python -m harness.gotools`` to build them all ahead of the tests; it prints
how long each cold build took.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.build import BuildError, go_binary

MODULES_DIR = Path(__file__).resolve().parent / "gotools"


@dataclass(frozen=True)
class GoTool:
    """One binary: the module directory holding its go.mod, the package to build, build tags."""

    module: str
    package: str
    tags: tuple[str, ...] = ()

    @property
    def module_dir(self) -> Path:
        """Where its go.mod and go.sum live."""
        return MODULES_DIR / self.module


TOOLS = {
    # remove_all_sd is Prometheus's own build tag that leaves out the service-discovery plugins
    # (cloud SDKs) promtool's rule checks and tests never use: a third of the cold build.
    "promtool": GoTool(
        "prometheus", "github.com/prometheus/prometheus/cmd/promtool", ("remove_all_sd",)
    ),
    "promql-names": GoTool("prometheus", "./promql-names"),
    "actionlint": GoTool("actionlint", "github.com/rhysd/actionlint/cmd/actionlint"),
}
# Cold builds on 2 cores with the modules already downloaded (a first download of the Prometheus
# module graph adds about a minute): promtool 130-180 s, promql-names 1 s after it (shared
# packages), actionlint 5 s. Warm: well under a second for all three (hashing the modules).
_LDFLAGS = "-s -w"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/nocturne/gotools`` (never in the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nocturne" / "gotools"


def cache_key(go: str, tool: GoTool) -> str:
    """Content hash of everything that determines the binary: the module's files, the Go
    version, the package, its tags and the link flags."""
    go_version = subprocess.run(
        [go, "version"], check=True, capture_output=True, text=True, env=_go_env()
    ).stdout
    digest = hashlib.sha256()
    for path in sorted(p for p in tool.module_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(tool.module_dir)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    for part in (go_version, tool.package, ",".join(tool.tags), _LDFLAGS):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def ensure(name: str, *, quiet: bool = True) -> Path:
    """The path of the built tool ``name`` (a key of ``TOOLS``), building it first if the
    cache has none. Raises BuildError without Go or when the build fails."""
    tool = TOOLS[name]
    go = go_binary()
    if go is None:
        raise BuildError(f"the Go toolchain ('go') is not on PATH; it is needed to build {name}")
    target = cache_root() / name / cache_key(go, tool) / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        # pytest-xdist workers or two sessions never build at once; the second reuses the first.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(go, name, tool, target, quiet=quiet)
    return target


def _build(go: str, name: str, tool: GoTool, target: Path, *, quiet: bool) -> None:
    if not quiet:
        print(f"[gotools] building {name} from {tool.module_dir} -> {target}", flush=True)
    tmp = target.with_suffix(".tmp")
    cmd = [go, "build", "-trimpath", "-ldflags", _LDFLAGS, "-o", str(tmp)]
    if tool.tags:
        cmd += ["-tags", ",".join(tool.tags)]
    started = time.monotonic()
    result = subprocess.run(
        [*cmd, tool.package],
        cwd=tool.module_dir,
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise BuildError(f"go build {name} failed (exit {result.returncode}):\n{tail}")
    tmp.rename(target)
    if not quiet:
        print(f"[gotools] built {name} in {elapsed:.0f} s", flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # As for kube-local: no toolchain download, no cgo, and go.sum must already pin everything.
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=readonly")
    return env


def main() -> int:
    """CLI: build or reuse every tool and print its path."""
    for name in TOOLS:
        started = time.monotonic()
        try:
            path = ensure(name, quiet=False)
        except BuildError as exc:
            print(f"[gotools] {exc}", file=sys.stderr)
            return 1
        print(f"[gotools] {name}: {path} ({time.monotonic() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
