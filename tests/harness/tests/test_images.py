"""The project's images built with podman from its own Dockerfiles on the local base
(harness.images), and the shape of those Dockerfiles the build relies on."""

from __future__ import annotations

import subprocess

import pytest

from harness import images
from harness.prerequisites import skip_or_fail


@pytest.mark.parametrize("image", images.IMAGES, ids=lambda i: i.name)
def test_every_stage_starts_from_the_published_python_base(image: images.Image) -> None:
    # The build swaps these lines (and only these) for the local base; users keep theirs.
    text = (images.REPO / image.dockerfile).read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms, image.dockerfile
    assert len(images._FROM.findall(text)) == len(froms), froms


def test_the_key_follows_the_build_context() -> None:
    runner = images.IMAGES[1]
    assert images.image_key(runner) == images.image_key(runner)
    assert images.image_key(runner) != images.image_key(images.IMAGES[0])
    assert len({images.base_key(), images.pause_key()}) == 2


@pytest.mark.e2e
def test_the_runner_image_runs_as_65532_on_a_read_only_root() -> None:
    missing = images.missing_tools()
    if missing:
        skip_or_fail(f"image builds need {', '.join(missing)} (.ci/install-system-deps)")
    built = images.ensure(images.IMAGES[1])
    probe = "import os, agent_runner.__main__, agent_runner.runapi; open('/probe', 'w')"
    result = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            *images.PODMAN_RUN_FLAGS,
            "--network=none",
            "--read-only",
            "--entrypoint=python",
            built.reference,
            "-c",
            probe + "\n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # The import works as the image's user; the write fails: the root is read-only.
    assert "Read-only file system" in result.stderr, result.stderr
    uid = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            *images.PODMAN_RUN_FLAGS,
            "--network=none",
            "--entrypoint=id",
            built.reference,
            "-u",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert uid.stdout.strip() == "65532"
