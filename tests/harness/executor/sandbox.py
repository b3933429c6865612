"""The bubblewrap command line that gives one container a kubelet-like view of this host.

Pure functions only (no process is started here): the executor decides *what* to mount, this
module decides *how* bwrap must be told, in which order, and which mount targets can work at all.

The sandbox is the host's root bound read-only (``--ro-bind / /``, never ``--dev-bind / /``,
which makes bwrap create mount points on the host), a private ``/dev``, ``/proc``, ``/tmp`` and
``/run``, private PID/IPC/UTS namespaces and the host network (there is no kube-proxy or CNI).
The command runs under ``setpriv`` with the pod's uid/gid and ``no_new_privs``.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# Replaced by an empty tmpfs in every sandbox: mount targets below them need no host directory.
SANDBOX_TMPFS = ("/tmp", "/run")  # noqa: S108 - sandbox paths, not temp files of ours
# Where bwrap may create mount points: the tmpfs dirs above plus bwrap's own /dev.
SANDBOX_OWNED = (*SANDBOX_TMPFS, "/dev")

# What runc/containerd give a root container by default (Docker's default capability set);
# the host-root bwrap would otherwise keep every capability.
DEFAULT_ROOT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)

_MAX_SYMLINKS = 40


class MountTargetError(ValueError):
    """A mount target that the read-only host root cannot offer (see ``check_target``)."""


@dataclass(frozen=True)
class Mount:
    """One bind mount: ``source`` on the host appears at ``target`` (already resolved)."""

    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class SandboxSpec:
    """Everything that decides the bwrap command line of one container."""

    argv: Sequence[str]
    uid: int
    gid: int
    groups: Sequence[int] = ()
    hostname: str = "localhost"
    working_dir: str = "/"
    mounts: Sequence[Mount] = ()
    # Host paths the command must see (interpreter, sys.prefix, the repository, ...): see
    # ``visibility_args``.
    host_paths: Sequence[str] = ()
    # Host directories to hide behind an empty tmpfs (the executor's own state: other pods'
    # volumes and logs), whatever made them visible.
    hidden: Sequence[str] = ()
    # readOnlyRootFilesystem: true also keeps /tmp unwritable, as in a real container.
    writable_tmp: bool = True
    no_new_privs: bool = True
    extra_bwrap_args: Sequence[str] = field(default_factory=tuple)


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def is_under(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or inside it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _host_readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def resolve_target(
    path: str,
    readlink: Callable[[str], str | None] = _host_readlink,
    owned: Sequence[str] = SANDBOX_OWNED,
) -> str:
    """Resolve symlinks in a mount target the way the sandbox will see them.

    Symlinks come from the read-only host root (``/var/run`` -> ``/run`` on Debian), except below
    the sandbox's own tmpfs dirs, which start empty: resolution stops there.
    """
    if not path.startswith("/"):
        raise MountTargetError(f"mount target {path!r} is not an absolute path")
    pending = _components(posixpath.normpath(path))
    done = "/"
    hops = 0
    while pending:
        if any(is_under(done, root) for root in owned):
            return posixpath.join(done, *pending)
        name = pending.pop(0)
        if name == "..":
            done = posixpath.dirname(done)
            continue
        candidate = posixpath.join(done, name)
        link = readlink(candidate)
        if link is None:
            done = candidate
            continue
        hops += 1
        if hops > _MAX_SYMLINKS:
            raise MountTargetError(f"too many symbolic links while resolving {path!r}")
        if link.startswith("/"):
            done = "/"
        pending = _components(link) + pending
    return posixpath.normpath(done)


def check_target(
    target: str,
    *,
    is_dir: bool,
    host_kind: Callable[[str], str | None],
    writable_parents: Iterable[str] = (),
) -> None:
    """Raise ``MountTargetError`` unless bwrap can mount at ``target`` without touching the host.

    Works: targets below the sandbox's tmpfs dirs (/tmp, /run, /var/run, /dev), below a writable
    directory mount of the same container (``writable_parents``), or an existing host path of the
    same kind (file/dir). Anything else would need a new mount point in the read-only host root,
    which bwrap 0.8 cannot provide (no overlay support) - a deliberate limit of this executor.
    ``host_kind(path)`` returns "dir", "file" or None.
    """
    if any(is_under(target, root) and target != root for root in SANDBOX_OWNED):
        return
    if any(is_under(target, p) and target != p for p in writable_parents):
        return
    kind = host_kind(target)
    wanted = "dir" if is_dir else "file"
    if kind == wanted:
        return
    if kind is None:
        raise MountTargetError(
            f"mount path {target} does not exist on the host and is not below /tmp, /run, "
            "/var/run or /dev: the local executor's root filesystem is the host's, read-only, "
            "so it cannot create that mount point (mount below /run or /tmp instead)"
        )
    raise MountTargetError(
        f"mount path {target} is a {kind} on the host but the volume needs a {wanted}"
    )


def host_kind(path: str) -> str | None:
    """'dir', 'file' (anything else that exists counts as file) or None; follows symlinks."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def _host_mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def _world_traversable(mode: int) -> bool:
    return not stat.S_ISDIR(mode) or bool(mode & stat.S_IXOTH)


def _blocking_ancestor(path: str, mode_of: Callable[[str], int | None]) -> str | None:
    """The highest proper ancestor of ``path`` that others cannot traverse, if any."""
    prefix = ""
    for name in _components(path)[:-1]:
        prefix = f"{prefix}/{name}"
        mode = mode_of(prefix)
        if mode is not None and not _world_traversable(mode):
            return prefix
    return None


def visibility_plan(
    paths: Iterable[str],
    mode_of: Callable[[str], int | None] = _host_mode,
    on_skip: Callable[[str, str], None] | None = None,
) -> tuple[list[str], list[str]]:
    """(tmpfs dirs, paths to bind back) that make ``paths`` reachable for any uid.

    A path below the sandbox's tmpfs dirs is hidden and gets bound back. A path with an ancestor
    that others cannot traverse (``/root`` is 0700; CI clones into a 0700 ``mktemp -d``) gets a
    tmpfs over its *highest* such ancestor and is bound back read-only at the same place. Paths
    inside another listed path are covered by it. ``on_skip(path, why)`` reports paths that
    cannot be helped (missing, or themselves not traversable).
    """
    wanted = sorted({posixpath.normpath(p) for p in paths if p.startswith("/")})
    kept: list[str] = []
    for path in wanted:
        if path != "/" and not any(is_under(path, k) for k in kept):
            kept.append(path)
    tmpfs: list[str] = []
    binds: list[str] = []
    for path in kept:
        mode = mode_of(path)
        problem = (
            "does not exist"
            if mode is None
            else None
            if _world_traversable(mode)
            else "is a directory others cannot traverse (o+x missing)"
        )
        if problem is not None:
            if on_skip is not None:
                on_skip(path, problem)
            continue
        if any(is_under(path, root) for root in SANDBOX_TMPFS):
            binds.append(path)  # hidden by the sandbox's own tmpfs: bind it back
            continue
        blocked = _blocking_ancestor(path, mode_of)
        if blocked is None:
            continue
        if blocked not in tmpfs:
            tmpfs.append(blocked)
        binds.append(path)
    return tmpfs, binds


class _Args:
    """bwrap arguments plus the directories the sandbox itself owns.

    bwrap creates missing parents of a mount point with mode 0700, which a non-root container
    cannot traverse; every such parent below a sandbox-owned directory is therefore created
    first with ``--perms 0755 --dir``.
    """

    def __init__(self, owned: Iterable[str]) -> None:
        self.argv: list[str] = []
        self.owned = list(owned)
        self._made: set[str] = set()

    def parents(self, target: str) -> None:
        prefix = ""
        for name in _components(target)[:-1]:
            prefix = f"{prefix}/{name}"
            below_owned = any(is_under(prefix, r) and prefix != r for r in self.owned)
            if below_owned and prefix not in self._made:
                self._made.add(prefix)
                self.argv += ["--perms", "0755", "--dir", prefix]

    def forget_below(self, targets: Iterable[str]) -> None:
        """Directories made below ``targets`` are hidden by the mounts there: make them anew."""
        self._made = {d for d in self._made if not any(is_under(d, t) and d != t for t in targets)}

    def mount(self, option: str, source: str, target: str) -> None:
        self.parents(target)
        self.argv += [option, source, target]
        self._made.add(target)  # exists from now on


def visibility_args(
    paths: Iterable[str],
    mode_of: Callable[[str], int | None] = _host_mode,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[str]:
    """bwrap args for ``visibility_plan``: the tmpfs dirs first (each hides what is below it),
    then the read-only binds, with world-traversable parents."""
    return _visible(paths, SANDBOX_TMPFS, mode_of, on_skip).argv


def _visible(
    paths: Iterable[str],
    owned: Sequence[str],
    mode_of: Callable[[str], int | None],
    on_skip: Callable[[str, str], None] | None,
) -> _Args:
    """``visibility_args`` as ``_Args`` that own ``owned`` plus the new tmpfs dirs, for more
    mounts to follow."""
    tmpfs, binds = visibility_plan(paths, mode_of, on_skip)
    args = _Args([*owned, *tmpfs])
    for directory in tmpfs:
        args.argv += ["--tmpfs", directory]
    for path in binds:
        args.mount("--ro-bind", path, path)
    return args


def _mount_depth(mount: Mount) -> int:
    return len(_components(mount.target))


def build_bwrap_argv(
    spec: SandboxSpec,
    *,
    bwrap: str = "bwrap",
    setpriv: str = "setpriv",
    mode_of: Callable[[str], int | None] = _host_mode,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[str]:
    """The full argv (bwrap ... setpriv ... command) for ``spec``; order matters to bwrap.

    Pure except for ``mode_of`` (host ``st_mode`` lookups for ``spec.host_paths``).
    """
    argv = [
        bwrap,
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        spec.hostname,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    if spec.writable_tmp:
        argv += ["--perms", "1777"]
    argv += ["--tmpfs", "/tmp", "--tmpfs", "/run"]  # noqa: S108
    args = _visible(spec.host_paths, SANDBOX_OWNED, mode_of, on_skip)
    for path in spec.hidden:
        args.parents(path)
        args.argv += ["--tmpfs", path]
    # Parents before children, like containerd sorts mounts; stable for equal depth.
    for mount in sorted(spec.mounts, key=_mount_depth):
        args.mount("--ro-bind" if mount.read_only else "--bind", mount.source, mount.target)
        if not mount.read_only:
            args.owned.append(mount.target)  # nested mount points land in this writable dir
    # A volume over an ancestor of a path the command needs (an emptyDir at /tmp over a checkout
    # under /tmp, as in CI's clone) hides that path again: bind it back on top.
    _, needed = visibility_plan(spec.host_paths, mode_of, None)
    covered = [
        p for p in needed if any(is_under(p, m.target) and p != m.target for m in spec.mounts)
    ]
    if covered:
        args.forget_below([m.target for m in spec.mounts])
        for path in covered:
            args.mount("--ro-bind", path, path)
    argv += args.argv
    if spec.uid == 0:
        argv += ["--cap-drop", "ALL"]
        for cap in DEFAULT_ROOT_CAPABILITIES:
            argv += ["--cap-add", cap]
    argv += list(spec.extra_bwrap_args)
    argv += ["--chdir", spec.working_dir]
    argv += [setpriv, f"--reuid={spec.uid}", f"--regid={spec.gid}"]
    if spec.groups:
        argv.append("--groups=" + ",".join(str(g) for g in spec.groups))
    else:
        argv.append("--clear-groups")
    if spec.no_new_privs:
        argv.append("--no-new-privs")
    argv.append("--")
    argv += list(spec.argv)
    return argv
