"""Getting a claimed pod ready to run: admission (supported shape, known image) and the launch
plan (env, volumes, mounts, identity, bwrap command line)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.executor import sandbox
from harness.executor.api import KubeApi
from harness.executor.downward import HostCapacity
from harness.executor.env import (
    DEFAULT_PATH,
    container_argv,
    container_environment,
    resolve_env,
)
from harness.executor.hostpaths import host_paths_for
from harness.executor.identity import container_identity
from harness.executor.images import ImageEntry, ImageTable
from harness.executor.objects import ObjectCache
from harness.executor.pod import JSON, PodStartError, get_items, get_map, get_text
from harness.executor.podspec import pod_hostname, unsupported_reason
from harness.executor.reasons import REASON_IMAGE, REASON_UNSUPPORTED
from harness.executor.runs import LaunchPlan, PodRun
from harness.executor.status import ContainerInfo
from harness.executor.volumes import (
    VolumeSources,
    container_mounts,
    materialise_volumes,
    termination_log_mount,
)

log = logging.getLogger("nocturne.executor")


@dataclass(frozen=True)
class Node:
    """What every container start on this host uses: the API (Secrets, ConfigMaps, tokens), the
    image table, the sandbox tools and the executor's state directory."""

    api: KubeApi
    state_dir: Path
    images: ImageTable
    bwrap: str
    setpriv: str
    service_env: dict[str, str]
    capacity: HostCapacity


def admit(node: Node, run: PodRun, pod: JSON) -> tuple[JSON, str, ImageEntry]:
    """Checks that need no API call: supported shape, known image. Sets ``run.info`` first, so
    a rejection can name the container."""
    problem = unsupported_reason(pod)
    containers = get_items(get_map(pod, "spec"), "containers")
    container = containers[0] if containers else {}
    name = get_text(container, "name")
    image = get_text(container, "image")
    run.info = ContainerInfo(name, image, "")
    if problem is not None:
        raise PodStartError(REASON_UNSUPPORTED, problem)
    images = node.images
    found = images.lookup(image)
    if found is None:
        raise PodStartError(
            REASON_IMAGE,
            f"image {image!r} is not in {images.source}; known repositories: "
            f"{sorted(images.entries)} (pass --images FILE.json to add one)",
        )
    image_key, entry = found
    program = entry.entrypoint[0] if entry.entrypoint else ""
    if program.startswith("/") and not os.path.exists(program):
        raise PodStartError(
            REASON_IMAGE,
            f"image {image!r} maps to {program}, which does not exist on this host "
            f"({images.source})",
        )
    run.info = ContainerInfo(name, image, f"local://{image_key}")
    return container, image_key, entry


def prepare(node: Node, run: PodRun, pod: JSON, container: JSON, entry: ImageEntry) -> LaunchPlan:
    """Resolve env, materialise volumes and build the sandbox command line."""
    spec = get_map(pod, "spec")
    name = get_text(container, "name")
    identity = container_identity(pod, container)
    pod_dir = run.pod_dir
    pod_dir.mkdir(parents=True, exist_ok=True)
    pod_dir.chmod(0o700)  # secrets live below; containers see only what is bound in
    (pod_dir / "uid").write_text(run.key.uid + "\n")
    # Volumes and the termination-log are per pod *incarnation*: a pod recreated under the
    # same name must not share them with one that is still stopping.
    private = run.private_dir
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(mode=0o700)
    objects = ObjectCache(node.api, run.key.namespace)
    env = resolve_env(
        pod,
        container,
        objects,
        node.service_env,
        node.capacity,
        on_skip=lambda msg: log.info("%s: %s", run.key, msg),
    )
    sources = VolumeSources(pod, identity, objects, node.api, node.capacity)
    volumes = materialise_volumes(get_items(spec, "volumes"), sources, private / "volumes")
    mounts = container_mounts(container, volumes, env)
    run.log_path = pod_dir / f"{name}.log"
    run.term_path = private / f"{name}.termination-log"
    run.term_path.write_bytes(b"")
    run.term_path.chmod(0o666)  # the kubelet's makeMounts does the same for non-root users
    mounts.append(termination_log_mount(container, run.term_path, mounts))
    run.message_policy = get_text(container, "terminationMessagePolicy", "File")
    hostname = pod_hostname(pod)
    final_env = container_environment(hostname, entry, env, identity.uid)
    argv = container_argv(entry, container, final_env)
    working_dir = get_text(container, "workingDir") or entry.working_dir
    spec_sandbox = sandbox.SandboxSpec(
        argv=argv,
        uid=identity.uid,
        gid=identity.gid,
        groups=identity.groups,
        hostname=hostname,
        working_dir=working_dir,
        mounts=mounts,
        host_paths=host_paths_for(
            argv[0], final_env.get("PATH", DEFAULT_PATH), working_dir, node.state_dir
        ),
        hidden=[os.path.realpath(node.state_dir)],
        writable_tmp=not identity.read_only_root,
        no_new_privs=identity.no_new_privs,
    )
    command = sandbox.build_bwrap_argv(
        spec_sandbox,
        bwrap=node.bwrap,
        setpriv=node.setpriv,
        on_skip=lambda p, why: log.info("%s: host path %s not made visible: %s", run.key, p, why),
    )
    return LaunchPlan(command, final_env, identity.uid, argv[0])
