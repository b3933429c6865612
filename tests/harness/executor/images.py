"""The image table: images are not pulled, their repository names map to local entry points."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import tools


@dataclass(frozen=True)
class ImageEntry:
    """What a container image would provide: ENTRYPOINT, CMD, ENV and WORKDIR."""

    entrypoint: tuple[str, ...]
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = "/"


# The images' PATH (their venv first), so `command: [nocturne, db, upgrade]` works as in the image.
_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_images() -> dict[str, ImageEntry]:
    """The built-in table: Nocturne's images run from this checkout's venv; busybox is the host."""
    venv_path = (("PATH", f"{Path(sys.executable).parent}:{_IMAGE_PATH}"),)
    return {
        "nocturne-operator": ImageEntry((sys.executable, "-m", "nocturne_operator"), env=venv_path),
        "nocturne-runner": ImageEntry((sys.executable, "-m", "agent_runner"), env=venv_path),
        # busybox's ENTRYPOINT is empty and its CMD is ["sh"]: command/args run on the host's
        # read-only root (/bin/sh, sleep, id, ...).
        "busybox": ImageEntry((), ("sh",)),
        # The pinned kubectl of tools.py (ENTRYPOINT ["kubectl"] in registry.k8s.io/kubectl);
        # in-cluster config comes from the projected service-account volume.
        "kubectl": ImageEntry((str(tools.tools_dir() / "bin" / "kubectl"),)),
    }


def image_repository(image: str) -> str:
    """The repository part of an image reference: no tag, no digest ('a/b:1@sha256:x' -> 'a/b')."""
    ref = image.split("@", 1)[0]
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        ref = ref[:colon]
    return ref


def _parse_entry(key: str, raw: object, source: str) -> ImageEntry:
    where = f"{source}: image {key!r}"
    if isinstance(raw, list):
        raw = {"entrypoint": raw}
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected a list (entrypoint) or an object, got {raw!r}")
    unknown = set(raw) - {"entrypoint", "args", "env", "workingDir"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")

    def strings(name: str) -> tuple[str, ...]:
        value = raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {name} must be a list of strings")
        return tuple(value)

    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError(f"{where}: env must map names to strings")
    working_dir = raw.get("workingDir", "/")
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise ValueError(f"{where}: workingDir must be an absolute path")
    return ImageEntry(strings("entrypoint"), strings("args"), tuple(env.items()), working_dir)


class ImageTable:
    """Maps image references to local entry points by repository name.

    A key matches an image whose repository (tag and digest stripped) equals the key or ends
    with ``/<key>``, so ``nocturne-runner`` matches ``ghcr.io/x/nocturne-runner:1.2``; the
    longest matching key wins.
    """

    def __init__(self, entries: Mapping[str, ImageEntry], source: str) -> None:
        self.entries = {image_repository(k): v for k, v in entries.items()}
        self.source = source

    @classmethod
    def load(cls, path: Path | None) -> ImageTable:
        """Defaults, extended/overridden by the JSON object in ``path`` (name -> argv | entry)."""
        entries = default_images()
        if path is None:
            return cls(entries, "the executor's built-in image table")
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"{path}: expected a JSON object mapping image names to entries")
        for key, value in raw.items():
            entries[key] = _parse_entry(key, value, str(path))
        return cls(entries, f"the image table {path} (plus built-in defaults)")

    def lookup(self, image: str) -> tuple[str, ImageEntry] | None:
        """The (key, entry) for ``image``, or None if no key matches."""
        repo = image_repository(image)
        best: str | None = None
        for key in self.entries:
            if (repo == key or repo.endswith("/" + key)) and (best is None or len(key) > len(best)):
                best = key
        return None if best is None else (best, self.entries[best])
