"""The bubblewrap command line: mount targets, host-path visibility for non-root users, order."""

from __future__ import annotations

import stat
from collections.abc import Callable

import pytest

from harness.executor.sandbox import (
    Mount,
    MountTargetError,
    SandboxSpec,
    build_bwrap_argv,
    check_target,
    resolve_target,
    visibility_args,
)

# Paths inside the sandbox (its own tmpfs), not temporary files of this test.
TMP = "/tmp"  # noqa: S108
DIR_755 = stat.S_IFDIR | 0o755
DIR_700 = stat.S_IFDIR | 0o700
FILE_644 = stat.S_IFREG | 0o644


def modes(table: dict[str, int]) -> Callable[[str], int | None]:
    """A fake host: listed paths have the given mode, others are ordinary 0755 directories
    except when missing from every listed path's ancestry."""

    def mode_of(path: str) -> int | None:
        return table.get(path, DIR_755)

    return mode_of


LINKS = {"/var/run": "/run", "/etc/alt": "../opt/real", "/loop": "/loop"}


def readlink(path: str) -> str | None:
    return LINKS.get(path)


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        (
            "/var/run/secrets/kubernetes.io/serviceaccount",
            "/run/secrets/kubernetes.io/serviceaccount",
        ),
        ("/run/x", "/run/x"),
        ("/etc/alt/conf", "/opt/real/conf"),
        ("/a/./b/../c", "/a/c"),
        (f"{TMP}/var/run", f"{TMP}/var/run"),  # below a sandbox tmpfs nothing is resolved
    ],
)
def test_resolve_target(path: str, resolved: str) -> None:
    assert resolve_target(path, readlink) == resolved


def test_resolve_target_rejects_loops_and_relative_paths() -> None:
    with pytest.raises(MountTargetError, match="too many symbolic links"):
        resolve_target("/loop/x", readlink)
    with pytest.raises(MountTargetError, match="not an absolute path"):
        resolve_target("rel/path", readlink)


def kinds(table: dict[str, str]) -> Callable[[str], str | None]:
    return table.get


@pytest.mark.parametrize(
    "target",
    ["/run/nocturne/config", f"{TMP}/x", "/dev/termination-log", "/data/sub/dir"],
)
def test_targets_that_need_no_host_mount_point(target: str) -> None:
    check_target(target, is_dir=True, host_kind=kinds({}), writable_parents=["/data"])


def test_existing_host_paths_of_the_right_kind_are_fine() -> None:
    check_target("/etc/ssl", is_dir=True, host_kind=kinds({"/etc/ssl": "dir"}))
    check_target("/etc/hosts", is_dir=False, host_kind=kinds({"/etc/hosts": "file"}))


def test_missing_host_path_outside_tmpfs_fails_clearly() -> None:
    with pytest.raises(MountTargetError) as info:
        check_target("/etc/nocturne", is_dir=True, host_kind=kinds({}))
    assert "/etc/nocturne does not exist on the host" in str(info.value)
    assert "below /run or /tmp" in str(info.value)


def test_kind_mismatch_fails() -> None:
    with pytest.raises(MountTargetError, match="is a file on the host but the volume needs a dir"):
        check_target("/etc/hosts", is_dir=True, host_kind=kinds({"/etc/hosts": "file"}))


def test_the_sandbox_roots_themselves_are_not_free_targets() -> None:
    with pytest.raises(MountTargetError):
        check_target("/run", is_dir=False, host_kind=kinds({}))


def test_visibility_tmpfs_over_highest_closed_ancestor_then_bind_back() -> None:
    mode_of = modes(
        {
            "/root": DIR_700,
            "/root/.pyenv/versions/3.11.7/bin/python3.11": FILE_644,
            "/srv/a": DIR_700,
            "/srv/a/b": DIR_700,
        }
    )
    args = visibility_args(
        [
            "/root/.pyenv/versions/3.11.7",
            "/root/.pyenv/versions/3.11.7/bin/python3.11",  # covered by its parent
            "/srv/a/b/repo",
            "/work/main",  # fully traversable: nothing to do
        ],
        mode_of,
    )
    # bwrap would create the missing parents 0700: they are made 0755 first.
    assert args == [
        "--tmpfs", "/root",
        "--tmpfs", "/srv/a",
        "--perms", "0755", "--dir", "/root/.pyenv",
        "--perms", "0755", "--dir", "/root/.pyenv/versions",
        "--ro-bind", "/root/.pyenv/versions/3.11.7", "/root/.pyenv/versions/3.11.7",
        "--perms", "0755", "--dir", "/srv/a/b",
        "--ro-bind", "/srv/a/b/repo", "/srv/a/b/repo",
    ]  # fmt: skip


def test_visibility_ci_clone_in_private_tmp_dir() -> None:
    # CI: `mktemp -d` (0700) below /tmp, which the sandbox replaces anyway: bind the repo back.
    private = TMP + "/" + "tmp.abc"  # mktemp -d, 0700
    clone = f"{private}/main"
    mode_of = modes({private: DIR_700})
    assert visibility_args([clone], mode_of) == [
        "--perms", "0755", "--dir", private,
        "--ro-bind", clone, clone,
    ]  # fmt: skip


def test_visibility_reports_what_it_cannot_fix() -> None:
    skipped: list[tuple[str, str]] = []
    mode_of = modes({"/opt/closed": DIR_700})

    def missing_too(path: str) -> int | None:
        return None if path == "/gone" else mode_of(path)

    args = visibility_args(
        ["/opt/closed", "/gone"], missing_too, lambda p, why: skipped.append((p, why))
    )
    assert args == []
    assert [p for p, _ in skipped] == ["/gone", "/opt/closed"]


def test_full_argv_order() -> None:
    spec = SandboxSpec(
        argv=["sh", "-c", "echo hi"],
        uid=65534,
        gid=65534,
        hostname="pod-a",
        working_dir="/work",
        mounts=[
            Mount("/state/v/cfg-sub", "/run/cfg/sub", read_only=True),
            Mount("/state/v/data", "/run/data", read_only=False),
            Mount("/state/v/cfg", "/run/cfg", read_only=True),
            Mount("/state/v/nested", "/run/deep/er/mount/x/y", read_only=True),
            Mount("/state/v/deep", "/run/deep/er/mount", read_only=False),
        ],
        host_paths=["/root/py"],
        writable_tmp=False,
    )
    argv = build_bwrap_argv(
        spec, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv", mode_of=modes({"/root": DIR_700})
    )
    assert argv[:7] == [
        "/usr/bin/bwrap",
        "--die-with-parent",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname",
        "pod-a",
    ]
    text = " ".join(argv)
    assert "--dev-bind" not in text
    assert "--dir /run/cfg " not in text  # a mount point exists once mounted
    assert "--perms 1777" not in text  # readOnlyRootFilesystem: /tmp is not writable either
    order = [
        "--ro-bind / /",
        "--dev /dev",
        "--proc /proc",
        "--tmpfs /tmp",
        "--tmpfs /run",
        "--tmpfs /root",
        "--ro-bind /root/py /root/py",
        "--bind /state/v/data /run/data",
        "--ro-bind /state/v/cfg /run/cfg",
        "--ro-bind /state/v/cfg-sub /run/cfg/sub",
        "--perms 0755 --dir /run/deep",
        "--perms 0755 --dir /run/deep/er",
        "--bind /state/v/deep /run/deep/er/mount",
        "--perms 0755 --dir /run/deep/er/mount/x",
        "--ro-bind /state/v/nested /run/deep/er/mount/x/y",
        "--chdir /work",
        "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs -- sh -c",
    ]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert argv[-3:] == ["sh", "-c", "echo hi"]


def test_a_volume_over_the_checkout_does_not_hide_it() -> None:
    """The runner mounts an emptyDir at /tmp; CI's clone lives below /tmp: bind it back on top."""
    private = TMP + "/" + "ci-local.abc"
    clone = f"{private}/project"
    spec = SandboxSpec(
        argv=["python", "-m", "agent_runner"],
        uid=65532,
        gid=65532,
        mounts=[Mount("/state/pod/tmp", TMP, read_only=False)],
        host_paths=[clone],
        writable_tmp=False,
    )
    text = " ".join(build_bwrap_argv(spec, mode_of=modes({private: DIR_700})))
    volume = text.index(f"--bind /state/pod/tmp {TMP}")
    again = text.index(f"--ro-bind {clone} {clone}", volume)
    assert text.index(f"--perms 0755 --dir {private}", volume) < again


def test_writable_tmp_groups_and_root_capabilities() -> None:
    argv = build_bwrap_argv(
        SandboxSpec(argv=["id"], uid=0, gid=0, groups=[10, 20], no_new_privs=False),
        mode_of=modes({}),
    )
    text = " ".join(argv)
    assert "--perms 1777 --tmpfs /tmp" in text
    assert "--groups=10,20" in text
    assert "--no-new-privs" not in text
    assert "--cap-drop ALL" in text
    assert "--cap-add CAP_CHOWN" in text
    assert "CAP_SYS_ADMIN" not in text
