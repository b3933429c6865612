"""Build (or reuse) the project's container images with podman, from its own Dockerfiles, with no
registry: the base is a Debian root made here by ``debootstrap`` and ``podman import``, and the
Dockerfiles' ``FROM python:...`` lines point at it in a copy made for the build (the files users
``docker build`` stay as they are).

Each result is a ``docker-archive`` tarball cached outside the repository, keyed by the content
hash of what determines it (the base recipe; the Dockerfile, the build context and the base's
key), as ``build.py`` caches kube-local: a warm run costs one hash. A node imports the tarballs
into its containerd (``harness.node``). ``python -m harness.images`` builds them all ahead and
prints how long each step took.

The node's pause (sandbox) image is built here too: a static Go program of ours, ``FROM scratch``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from harness import tools
from harness.build import BuildError, go_binary

REPO = Path(__file__).resolve().parents[2]
PAUSE_DIR = Path(__file__).resolve().parent / "pause"

# The base: Debian's Python 3.11 (the published images use python:3.11-slim) with what the
# Dockerfiles run: `python -m venv`, pip (bundled with venv), `useradd` (in minbase).
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# Dropped from the base root: caches and docs nothing in the images reads.
_BASE_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
# The Dockerfiles' published base, replaced at build time only.
_FROM = re.compile(r"^(FROM\s+)python:\S+", re.M)
# What the build context holds (the allow-list of .dockerignore) and so what the key hashes.
_CONTEXT = ("pyproject.toml", "README.md", "operator", "agent_runner")
# Podman on these machines: crun refuses the hybrid cgroup hierarchy, and raising rlimits is not
# permitted, so every container gets limits at or below the current ones.
PODMAN_RUN_FLAGS = (
    "--runtime=runc",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1000:1000",
)


@dataclass(frozen=True)
class Image:
    """One image of the project: its repository name and the Dockerfile that builds it."""

    name: str
    dockerfile: str


IMAGES = (
    Image("nocturne-operator", "operator/Dockerfile"),
    Image("nocturne-runner", "agent_runner/Dockerfile"),
)


@dataclass(frozen=True)
class BuiltImage:
    """A built image: the reference it was saved under and its docker-archive tarball."""

    reference: str
    archive: Path


class ImageBuildError(BuildError):
    """podman, debootstrap or go failed, or a Dockerfile no longer has the expected shape."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/nocturne/images`` (never in the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nocturne" / "images"


def missing_tools() -> list[str]:
    """The commands an image build needs that are not installed (empty when all are)."""
    return [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]


def _digest(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _tree(root: Path, names: Iterable[str]) -> Iterable[bytes]:
    for name in names:
        top = root / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            yield str(path.relative_to(root)).encode()
            yield path.read_bytes()


def base_key() -> str:
    """Content hash of the base recipe."""
    return _digest(s.encode() for s in (BASE_SUITE, BASE_MIRROR, *BASE_PACKAGES, *_BASE_PRUNE))


def image_key(image: Image) -> str:
    """Content hash of an image: its Dockerfile, the build context, the base and the flags."""
    parts = [base_key().encode(), (REPO / image.dockerfile).read_bytes()]
    parts += [" ".join(PODMAN_RUN_FLAGS).encode(), *_tree(REPO, _CONTEXT)]
    return _digest(parts)


def pause_key() -> str:
    """Content hash of the pause program and the Go version that builds it."""
    return _digest([*_tree(PAUSE_DIR, ["."]), _go_version().encode()])


class _Log:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def __call__(self, msg: str) -> None:
        self.say(f"[images] {msg}")


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


def _podman_has(reference: str) -> bool:
    return subprocess.run(["podman", "image", "exists", reference], check=False).returncode == 0


def _locked(build: Callable[[], None], target: Path) -> None:
    """Build ``target`` once: two test runs never build at once, the second reuses the result."""
    if target.exists():
        return
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            build()


def ensure_base(log: Callable[[str], None] = print) -> str:
    """The base image's reference in podman's storage, made from a cached root tarball."""
    say = _Log(log)
    key = base_key()
    tarball = cache_root() / f"base-{key}.tar"
    reference = f"localhost/nocturne-base:{key}"

    def build() -> None:
        started = time.monotonic()
        say(f"debootstrap {BASE_SUITE} ({', '.join(BASE_PACKAGES)}) -> {tarball}")
        with tempfile.TemporaryDirectory(prefix="nocturne-base-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    BASE_SUITE,
                    str(rootfs),
                    BASE_MIRROR,
                ],
                what="debootstrap",
            )
            for name in _BASE_PRUNE:
                shutil.rmtree(rootfs / name, ignore_errors=True)
            partial = tarball.with_suffix(".tmp")
            _run(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], what="tar"
            )
            partial.rename(tarball)
        say(f"base root built in {time.monotonic() - started:.0f} s")

    _locked(build, tarball)
    if not _podman_has(reference):
        _run(["podman", "import", "--quiet", str(tarball), reference], what="podman import")
    return reference


def ensure(image: Image, log: Callable[[str], None] = print) -> BuiltImage:
    """Build ``image`` from its Dockerfile on the local base, or reuse the cached archive."""
    say = _Log(log)
    key = image_key(image)
    reference = f"localhost/{image.name}:{key}"
    archive = cache_root() / f"{image.name}-{key}.tar"
    if archive.exists():
        return BuiltImage(reference, archive)
    base = ensure_base(log)

    def build() -> None:
        started = time.monotonic()
        text = (REPO / image.dockerfile).read_text()
        local, count = _FROM.subn(rf"\g<1>{base}", text)
        if count == 0:
            raise ImageBuildError(f"{image.dockerfile}: no 'FROM python:...' line to replace")
        with tempfile.TemporaryDirectory(prefix="nocturne-image-") as tmp:
            dockerfile = Path(tmp) / "Dockerfile"
            dockerfile.write_text(local)
            # pip in the build trusts what the host trusts (an egress proxy's CA, say): the
            # host's bundle and a pip.conf naming it are mounted for the build only.
            pip_conf = Path(tmp) / "pip.conf"
            pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
            bundle = "/etc/ssl/certs/ca-certificates.crt"
            _run(
                [
                    "podman",
                    "build",
                    *PODMAN_RUN_FLAGS,
                    "--network=host",
                    "--pull=never",
                    f"--volume={bundle}:{bundle}:ro",
                    f"--volume={pip_conf}:/etc/pip.conf:ro",
                    f"--file={dockerfile}",
                    f"--tag={reference}",
                    str(REPO),
                ],
                what=f"podman build of {image.dockerfile}",
            )
        built = time.monotonic()
        _save(reference, archive)
        say(
            f"{image.name} built in {built - started:.0f} s, saved in "
            f"{time.monotonic() - built:.0f} s ({archive.stat().st_size / 2**20:.0f} MiB)"
        )

    _locked(build, archive)
    return BuiltImage(reference, archive)


def ensure_pause(log: Callable[[str], None] = print) -> BuiltImage:
    """The node's sandbox image: ``pause/main.go`` built static, alone in a ``FROM scratch``."""
    say = _Log(log)
    key = pause_key()
    reference = f"localhost/nocturne-pause:{key}"
    archive = cache_root() / f"pause-{key}.tar"

    def build() -> None:
        started = time.monotonic()
        go = go_binary()
        if go is None:
            raise ImageBuildError("the Go toolchain ('go') is needed to build the pause image")
        with tempfile.TemporaryDirectory(prefix="nocturne-pause-") as tmp:
            env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": ""}
            result = subprocess.run(
                [go, "build", "-trimpath", "-ldflags=-s -w", "-o", f"{tmp}/pause", "."],
                cwd=PAUSE_DIR,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise ImageBuildError(f"go build of the pause program failed:\n{result.stderr}")
            Path(tmp, "Containerfile").write_text(
                'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
            )
            _run(
                ["podman", "build", *PODMAN_RUN_FLAGS, f"--tag={reference}", tmp],
                what="podman build of the pause image",
            )
        _save(reference, archive)
        say(f"pause image built in {time.monotonic() - started:.0f} s")

    _locked(build, archive)
    return BuiltImage(reference, archive)


# Archives kept per image (each change of the sources makes a new one; worktrees of different
# commits share the cache, so more than the newest).
_KEEP = 3


def _save(reference: str, archive: Path) -> None:
    partial = archive.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    _run(
        ["podman", "save", "--format=docker-archive", f"--output={partial}", reference],
        what="podman save",
    )
    partial.rename(archive)
    stem = archive.name.rsplit("-", 1)[0]
    older = sorted(
        (p for p in archive.parent.glob(f"{stem}-*.tar") if p.name.rsplit("-", 1)[0] == stem),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for stale in older[_KEEP:]:
        stale.unlink(missing_ok=True)


def _go_version() -> str:
    go = go_binary()
    if go is None:
        return "no go"
    return subprocess.run([go, "version"], check=True, capture_output=True, text=True).stdout


def ensure_base_archive(log: Callable[[str], None] = print) -> BuiltImage:
    """The base itself as a docker-archive: the node's shell image (the suite's ``busybox``
    pods need ``sh`` and a few tools, and no registry can give them busybox)."""
    key = base_key()
    archive = cache_root() / f"base-{key}.docker.tar"
    reference = ensure_base(log)
    _locked(lambda: _save(reference, archive), archive)
    return BuiltImage(reference, archive)


def ensure_kubectl(log: Callable[[str], None] = print) -> BuiltImage:
    """The pinned kubectl of ``tools.py`` on the base, ``ENTRYPOINT ["kubectl"]`` like
    registry.k8s.io/kubectl: the suite's in-cluster client pods."""
    kubectl = tools.ensure().kubectl
    key = _digest([base_key().encode(), kubectl.read_bytes()])
    reference = f"localhost/nocturne-kubectl:{key}"
    archive = cache_root() / f"kubectl-{key}.tar"

    def build() -> None:
        base = ensure_base(log)
        with tempfile.TemporaryDirectory(prefix="nocturne-kubectl-") as tmp:
            shutil.copy2(kubectl, Path(tmp) / "kubectl")
            Path(tmp, "Containerfile").write_text(
                f"FROM {base}\nCOPY kubectl /usr/local/bin/kubectl\n"
                'USER 65532:65532\nENTRYPOINT ["kubectl"]\n'
            )
            _run(
                ["podman", "build", *PODMAN_RUN_FLAGS, "--pull=never", f"--tag={reference}", tmp],
                what="podman build of the kubectl image",
            )
        _save(reference, archive)

    _locked(build, archive)
    return BuiltImage(reference, archive)


def ensure_all(log: Callable[[str], None] = print) -> dict[str, BuiltImage]:
    """Every image a node needs, by repository name (``pause`` for the sandbox image, ``base``
    for the shell image, ``kubectl`` for in-cluster client pods)."""
    built = {image.name: ensure(image, log) for image in IMAGES}
    built["pause"] = ensure_pause(log)
    built["base"] = ensure_base_archive(log)
    built["kubectl"] = ensure_kubectl(log)
    return built


def main() -> int:
    """CLI: build or reuse every image and print where each archive is."""
    missing = missing_tools()
    if missing:
        print(f"[images] not installed: {', '.join(missing)} (see .ci/install-system-deps)")
        return 1
    started = time.monotonic()
    try:
        built = ensure_all()
    except ImageBuildError as exc:
        print(f"[images] {exc}", file=sys.stderr)
        return 1
    for name, image in built.items():
        print(f"[images] {name}: {image.reference} ({image.archive})", flush=True)
    print(f"[images] ready in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
