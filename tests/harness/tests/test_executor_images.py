"""The executor's image table and Kubernetes ``$(VAR)`` expansion (pure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harness.executor import ImageEntry, ImageTable, expand, image_repository


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("busybox", "busybox"),
        ("busybox:1.37", "busybox"),
        ("docker.io/library/busybox:1.37", "docker.io/library/busybox"),
        ("ghcr.io/x/nocturne-runner:1.2", "ghcr.io/x/nocturne-runner"),
        ("localhost:5000/nocturne-runner", "localhost:5000/nocturne-runner"),
        ("localhost:5000/nocturne-runner:v1@sha256:abc", "localhost:5000/nocturne-runner"),
        ("nocturne-operator@sha256:0123", "nocturne-operator"),
    ],
)
def test_image_repository_strips_tag_and_digest(image: str, repository: str) -> None:
    assert image_repository(image) == repository


@pytest.mark.parametrize(
    ("image", "key"),
    [
        ("busybox", "busybox"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("ghcr.io/x/nocturne-runner:1.2", "nocturne-runner"),
        ("registry.local:5000/team/nocturne-operator@sha256:ff", "nocturne-operator"),
    ],
)
def test_default_table_matches_by_repository_name(image: str, key: str) -> None:
    found = ImageTable.load(None).lookup(image)
    assert found is not None
    assert found[0] == key


def test_default_entry_points() -> None:
    table = ImageTable.load(None)
    runner = table.lookup("nocturne-runner")
    operator = table.lookup("nocturne-operator")
    busybox = table.lookup("busybox")
    assert runner is not None
    assert runner[1].entrypoint == (sys.executable, "-m", "agent_runner")
    assert operator is not None
    assert operator[1].entrypoint == (sys.executable, "-m", "nocturne_operator")
    assert busybox is not None
    assert busybox[1].entrypoint == ()


@pytest.mark.parametrize("image", ["my-busybox", "nocturne-runner-extra:1", "ghcr.io/busybox2"])
def test_no_partial_name_matches(image: str) -> None:
    assert ImageTable.load(None).lookup(image) is None


def test_json_file_extends_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "images.json"
    path.write_text(
        json.dumps(
            {
                "busybox": ["/bin/true"],
                "ghcr.io/acme/tool": {
                    "entrypoint": ["/usr/bin/env"],
                    "args": ["echo", "hi"],
                    "env": {"A": "1"},
                    "workingDir": "/srv",
                },
            }
        )
    )
    table = ImageTable.load(path)
    assert str(path) in table.source
    busybox = table.lookup("busybox:1.37")
    assert busybox is not None
    assert busybox[1] == ImageEntry(("/bin/true",))
    tool = table.lookup("ghcr.io/acme/tool:3")
    assert tool is not None
    assert tool[1] == ImageEntry(("/usr/bin/env",), ("echo", "hi"), (("A", "1"),), "/srv")
    assert table.lookup("nocturne-runner") is not None  # defaults stay


def test_longest_key_wins(tmp_path: Path) -> None:
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"acme/busybox": ["/bin/false"]}))
    table = ImageTable.load(path)
    specific = table.lookup("ghcr.io/acme/busybox:1")
    generic = table.lookup("ghcr.io/other/busybox:1")
    assert specific is not None
    assert specific[0] == "acme/busybox"
    assert generic is not None
    assert generic[0] == "busybox"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[]", "expected a JSON object"),
        ('{"x": 3}', "image 'x'"),
        ('{"x": {"entrypoint": "sh"}}', "entrypoint must be a list of strings"),
        ('{"x": {"cmd": ["sh"]}}', "unknown keys ['cmd']"),
        ('{"x": {"workingDir": "rel"}}', "workingDir must be an absolute path"),
    ],
)
def test_bad_table_files_are_named(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "images.json"
    path.write_text(content)
    with pytest.raises((ValueError, TypeError), match=r"images\.json") as info:
        ImageTable.load(path)
    assert needle in str(info.value)


# Cases from kubernetes third_party/forked/golang/expansion/expand_test.go.
EXPANSION_ENV = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(VAR_A)", "A"),
        ("___$(VAR_B)___", "___B___"),
        ("$(VAR_A)-$(VAR_A)", "A-A"),
        ("$(VAR_A)-1", "A-1"),
        ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
        ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
        ("$$(VAR_A)$$(VAR_B)", "$(VAR_A)$(VAR_B)"),
        ("f000-$$VAR_A", "f000-$VAR_A"),
        ("foo\\$(VAR_C)bar", "foo\\Cbar"),
        ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
        ("$(VAR_A)$(VAR_A)", "AA"),
        ("$(VAR_REF)", "$(VAR_A)"),  # no recursion
        ("foo$(VAR_EMPTY)bar", "foobar"),
        ("$(VAR_DOES_NOT_EXIST)", "$(VAR_DOES_NOT_EXIST)"),
        ("$(VAR_A", "$(VAR_A"),
        ("$(VAR_A$(VAR_B)", "$(VAR_A$(VAR_B)"),
        ("$$$$$$(BIG_MONEY)", "$$$(BIG_MONEY)"),
        ("$VAR_A", "$VAR_A"),
        ("$", "$"),
        ("$$", "$"),
        ("foo$", "foo$"),
        ("$()", "$()"),
        ("$(VAR_A)$", "A$"),
        ("", ""),
    ],
)
def test_expand_like_the_kubelet(text: str, expected: str) -> None:
    assert expand(text, EXPANSION_ENV) == expected
