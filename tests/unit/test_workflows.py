"""The GitHub workflows, which cannot run here: actionlint (built from the Go module proxy, with
shellcheck for every run: script) passes each of them, every action is pinned by commit, and
the release workflow builds, attests, signs and publishes what the README tells users to
install."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from harness import gotools
from harness.build import BuildError
from harness.prerequisites import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"


@functools.cache
def actionlint() -> tuple[Path, str]:
    """actionlint and the shellcheck it runs on every ``run:`` script."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        skip_or_fail("shellcheck is not installed (.ci/install-system-deps installs it)")
    try:
        binary = gotools.ensure("actionlint")
    except BuildError as exc:
        skip_or_fail(f"actionlint could not be built: {exc}")
        raise  # unreachable: skip_or_fail raises
    return binary, str(shellcheck)


def lint(*paths: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary, shellcheck = actionlint()
    return subprocess.run(
        # pyflakes off: no workflow runs Python scripts inline, and a machine with pyflakes on
        # its PATH must lint exactly as one without.
        [str(binary), "-no-color", "-shellcheck", shellcheck, "-pyflakes=", *map(str, paths)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def test_actionlint_passes_every_workflow() -> None:
    files = workflow_files()
    assert RELEASE in files
    result = lint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_what_is_wrong(tmp_path: Path) -> None:
    """The lint really reads the workflows: an undefined job output and an unquoted variable
    in a script are both reported."""
    broken = RELEASE.read_text().replace("needs.prepare.outputs.owner", "needs.prep.outputs.owner")
    broken = broken.replace('cosign sign --yes "${IMAGE}@${DIGEST}"', "cosign sign --yes $IMAGE")
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    path = tmp_path / ".github" / "workflows" / "release.yml"
    path.write_text(broken)
    result = lint(path, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'property "prep" is not defined' in result.stdout
    assert "SC2086" in result.stdout  # shellcheck ran


USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def test_every_action_is_pinned_by_commit_with_its_release_named() -> None:
    found = 0
    for path in workflow_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = USES.match(line)
            if match is None:
                continue
            found += 1
            ref, rest = match.groups()
            where = f"{path.name}:{number}: {line.strip()}"
            assert PINNED.match(ref), f"{where}: pin the action by its full commit SHA"
            assert re.fullmatch(r"\s*#\s*v\d+(\.\d+){0,2}", rest), (
                f"{where}: say which release the SHA is (# vX.Y.Z)"
            )
    assert found >= 10


def release() -> dict[Any, Any]:
    doc: dict[Any, Any] = yaml.safe_load(RELEASE.read_text())
    return doc


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if str(s.get("uses", "")).startswith(action + "@")]


def test_release_runs_on_version_tags_only() -> None:
    # YAML 1.1 reads the key `on` as True.
    triggers = release()[True]
    assert triggers == {"push": {"tags": ["v*"]}}
    assert release()["permissions"] == {"contents": "read"}


def test_release_builds_both_images_for_two_platforms_with_attestations() -> None:
    job = release()["jobs"]["images"]
    images = {m["image"]: m["dockerfile"] for m in job["strategy"]["matrix"]["include"]}
    assert images == {
        "nocturne-operator": "operator/Dockerfile",
        "nocturne-runner": "agent_runner/Dockerfile",
    }
    for dockerfile in images.values():
        assert (REPO / dockerfile).is_file()
    assert job["env"]["IMAGE"] == "ghcr.io/${{ needs.prepare.outputs.owner }}/${{ matrix.image }}"
    [build] = steps_using(job, "docker/build-push-action")
    options = build["with"]
    assert options["file"] == "${{ matrix.dockerfile }}"
    assert set(options["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert options["push"] is True
    assert options["sbom"] is True
    assert options["provenance"] == "mode=max"
    assert steps_using(job, "docker/setup-qemu-action")
    assert steps_using(job, "docker/setup-buildx-action")
    [login] = steps_using(job, "docker/login-action")
    assert login["with"]["registry"] == "ghcr.io"


def test_release_signs_each_image_by_digest_keyless() -> None:
    job = release()["jobs"]["images"]
    assert job["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}
    assert steps_using(job, "sigstore/cosign-installer")
    [sign] = [s for s in job["steps"] if "cosign sign" in s.get("run", "")]
    assert sign["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"
    assert '"${IMAGE}@${DIGEST}"' in sign["run"]
    assert "--key" not in sign["run"]


def test_release_publishes_the_chart_where_the_readme_installs_it_from() -> None:
    job = release()["jobs"]["chart"]
    assert job["needs"] == ["prepare", "images"], "the chart only after its images exist"
    assert job["env"]["CHARTS"] == "ghcr.io/${{ needs.prepare.outputs.owner }}/charts"
    [publish] = [s for s in job["steps"] if "helm push" in s.get("run", "")]
    assert "helm package helm/nocturne" in publish["run"]
    assert 'helm push "dist/nocturne-${VERSION}.tgz" "oci://${CHARTS}"' in publish["run"]
    readme = (REPO / "README.md").read_text()
    assert "helm install nocturne oci://ghcr.io/" in readme
    assert "/charts/nocturne --version" in readme


def test_release_refuses_a_tag_that_is_not_the_chart_version(tmp_path: Path) -> None:
    """The version check of the prepare job, run as bash: the tag must be the chart's version
    and appVersion (the images' default tag)."""
    [check] = [s for s in release()["jobs"]["prepare"]["steps"] if s.get("id") == "version"]
    chart = REPO / "helm" / "nocturne" / "Chart.yaml"
    version = yaml.safe_load(chart.read_text())["version"]
    (tmp_path / "helm" / "nocturne").mkdir(parents=True)
    shutil.copy(chart, tmp_path / "helm" / "nocturne" / "Chart.yaml")

    def run(tag: str) -> tuple[subprocess.CompletedProcess[str], str]:
        output = tmp_path / f"output-{tag}"
        output.write_text("")
        env = {
            "PATH": "/usr/bin:/bin",
            "GITHUB_REF_NAME": tag,
            "GITHUB_REPOSITORY_OWNER": "Nocturne-Dev",
            "GITHUB_OUTPUT": str(output),
        }
        result = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", check["run"]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result, output.read_text()

    good, outputs = run(f"v{version}")
    assert good.returncode == 0, good.stdout + good.stderr
    assert outputs.splitlines() == [f"version={version}", "owner=nocturne-dev"]
    bad, _ = run("v99.0.0")
    assert bad.returncode == 1
    assert f"tag v99.0.0, but Chart.yaml has version {version}" in bad.stdout
