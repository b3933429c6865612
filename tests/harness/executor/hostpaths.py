"""The host paths a non-root container must be able to see (interpreter, repository, the
command and its ``#!`` interpreter), never the executor's own state."""

from __future__ import annotations

import os
import posixpath
import sys
from pathlib import Path

from harness.executor import sandbox

REPO_ROOT = Path(__file__).resolve().parents[3]


def _which(command: str, path_env: str, working_dir: str) -> str | None:
    if "/" in command:
        candidate = command if command.startswith("/") else posixpath.join(working_dir, command)
        return candidate if os.path.isfile(candidate) else None
    for directory in path_env.split(":"):
        candidate = posixpath.join(directory or ".", command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _shebang(path: str, path_env: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    if posixpath.basename(words[0]) == "env" and len(words) > 1:
        return _which(words[1], path_env, "/")
    return words[0]


def host_paths_for(command: str, path_env: str, working_dir: str, state_dir: Path) -> list[str]:
    """Host paths a non-root container needs to see: this interpreter (``sys.prefix``,
    ``sys.base_prefix``), the repository, ``sys.path``, the working directory, and the command's
    executable plus its ``#!`` interpreter. The executor's state dir is never exposed."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.executable,
        str(REPO_ROOT),
        os.getcwd(),
        *(p for p in sys.path if p),
    }
    exe = _which(command, path_env, working_dir)
    if exe is not None:
        candidates.add(exe)
        interpreter = _shebang(exe, path_env)
        if interpreter is not None:
            candidates.add(interpreter)
    state = os.path.realpath(state_dir)
    found = set()
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.exists(real) and not sandbox.is_under(real, state):
            found.add(real)
    return sorted(found)
