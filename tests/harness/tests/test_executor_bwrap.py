"""The executor's sandbox for real: bubblewrap + setpriv run commands as uid 65534 on a read-only
root with a termination-log and a configMap-like volume (no cluster needed, but root and bwrap)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.executor import (
    DEFAULT_PATH,
    FileProjection,
    exit_code_of,
    host_paths_for,
    main_process,
    sandbox,
    write_volume,
)
from harness.prerequisites import skip_or_fail

NOBODY = 65534


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    if shutil.which("bwrap") is None or shutil.which("setpriv") is None:
        skip_or_fail("bubblewrap and setpriv are needed (apt-get install bubblewrap)")
    if os.geteuid() != 0:
        skip_or_fail("the executor's sandbox switches uid with setpriv, which needs root")


def run_sandboxed(spec: sandbox.SandboxSpec, log: Path, timeout: float = 60) -> int:
    argv = sandbox.build_bwrap_argv(spec)
    with log.open("wb") as out:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": DEFAULT_PATH, "HOME": "/"},
            timeout=timeout,
            check=False,
        )
    return exit_code_of(proc.returncode)


def test_non_root_read_only_root_termination_log_and_config_volume(tmp_path: Path) -> None:
    config = tmp_path / "volumes" / "cfg"
    write_volume(config, [FileProjection("greeting", b"hello", 0o644)], None)
    termination = tmp_path / "termination-log"
    termination.write_bytes(b"")
    termination.chmod(0o666)
    log = tmp_path / "main.log"
    script = (
        "id -u; id -g; cat /run/nocturne/config/greeting; echo; "
        "touch /etc/nocturne-x 2>/dev/null || echo root-is-read-only; "
        "touch /run/nocturne/config/x 2>/dev/null || echo volume-is-read-only; "
        'echo \'{"status": "ok"}\' > /dev/termination-log; exit 4'
    )
    spec = sandbox.SandboxSpec(
        argv=["sh", "-c", script],
        uid=NOBODY,
        gid=NOBODY,
        hostname="pod-x",
        mounts=[
            sandbox.Mount(str(config), sandbox.resolve_target("/var/run/nocturne/config"), True),
            sandbox.Mount(str(termination), "/dev/termination-log", False),
        ],
    )
    assert run_sandboxed(spec, log) == 4
    assert log.read_text().split() == [
        str(NOBODY),
        str(NOBODY),
        "hello",
        "root-is-read-only",
        "volume-is-read-only",
    ]
    assert termination.read_text() == '{"status": "ok"}\n'
    assert not Path("/etc/nocturne-x").exists()
    assert not Path("/dev/termination-log").exists(), "bwrap must not create host mount points"


def test_python_from_the_venv_imports_the_project_as_nobody(tmp_path: Path) -> None:
    # /root is 0700 here and CI clones into a 0700 mktemp -d: the sandbox must re-expose the
    # interpreter, sys.prefix and the repository for an unprivileged uid.
    code = "import os, kubernetes, nocturne_operator; print(os.getuid(), 'imported')"
    argv = [sys.executable, "-c", code]
    spec = sandbox.SandboxSpec(
        argv=argv,
        uid=NOBODY,
        gid=NOBODY,
        host_paths=host_paths_for(argv[0], DEFAULT_PATH, "/", tmp_path / "state"),
    )
    log = tmp_path / "py.log"
    assert run_sandboxed(spec, log) == 0, log.read_text()
    assert log.read_text().strip() == f"{NOBODY} imported"


def test_state_dir_is_hidden_and_tmp_follows_read_only_root(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "secret").mkdir(parents=True)
    script = f"ls -A {state}; touch /tmp/x 2>/dev/null && echo tmp-writable || echo tmp-read-only"
    log = tmp_path / "ls.log"
    base = sandbox.SandboxSpec(
        argv=["sh", "-c", script],
        uid=NOBODY,
        gid=NOBODY,
        host_paths=[str(tmp_path)],
        hidden=[str(state)],
    )
    assert run_sandboxed(base, log) == 0
    assert log.read_text().split() == ["tmp-writable"]
    read_only = dataclasses.replace(base, writable_tmp=False)
    assert run_sandboxed(read_only, log) == 0
    assert log.read_text().split() == ["tmp-read-only"]


def _spawn(script: str) -> subprocess.Popen[bytes]:
    spec = sandbox.SandboxSpec(argv=["sh", "-c", script], uid=NOBODY, gid=NOBODY)
    return subprocess.Popen(
        sandbox.build_bwrap_argv(spec),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={"PATH": DEFAULT_PATH},
        start_new_session=True,
    )


def _main(proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 10
    while (pid := main_process(proc.pid)) is None:
        assert time.monotonic() < deadline, "the container's main process never appeared"
        time.sleep(0.05)
    return pid


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("trap 'exit 7' TERM; while :; do sleep 0.1; done", 7),
        ("while :; do sleep 0.1; done", 143),
    ],
)
def test_sigterm_reaches_the_main_process_only(script: str, code: int) -> None:
    proc = _spawn(script)
    try:
        os.kill(_main(proc), signal.SIGTERM)
        assert exit_code_of(proc.wait(10)) == code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigkill_of_the_group_reports_137() -> None:
    proc = _spawn("trap '' TERM; while :; do sleep 0.1; done")
    _main(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert exit_code_of(proc.wait(10)) == 137
