"""The pod executor: the kubelet stand-in of the local e2e control plane (test/dev only).

It claims unbound Pending pods, runs their container as a local process inside bubblewrap (see
``sandbox.py``) and writes kubelet-compatible pod status, so the real Job/CronJob/Deployment
controllers see pods start, finish, fail and terminate. Run it as

    PYTHONSAFEPATH=1 PYTHONPATH=tests python -m harness.executor \
        --kubeconfig K --state-dir D [--images images.json] [--ready-file F]

(the repository root must not be on ``sys.path``: ``operator/`` would shadow the stdlib), or from
Python with ``run_executor()``. SIGTERM/SIGINT stop it: every container is killed, its pod marked
Failed, and the process exits 0.

Deliberate differences from a kubelet, each chosen to keep tests simple and honest:

* Pods are never bound (``spec.nodeName`` stays empty, recipe 3.2): the apiserver deletes them at
  once, only finalizers keep them; PodScheduled=True is written for readability only.
* One container and no init containers; anything else fails the pod with reason
  UnsupportedPodSpec instead of running something different. ``restartPolicy`` Always/OnFailure
  (Deployments) restart the container in place with the kubelet's CrashLoopBackOff delays
  (at once, then 10 s doubling to 5 min); the log file keeps every run's output.
* Images are not pulled: an image table maps repository names to local entry points. An unknown
  image, a missing Secret/ConfigMap/key or an impossible mount fails the pod *at once* (phase
  Failed, container terminated with exit code 128, like a runc StartError) where a kubelet would
  retry forever with the pod Pending; a Failed pod keeps Job controllers moving.
* The root filesystem is the host's, always read-only; /tmp (world-writable unless
  ``readOnlyRootFilesystem``) and /run are private tmpfs. Mount paths must lie below /tmp, /run,
  /var/run or /dev, below a writable emptyDir mount, or exist on the host.
* Without ``runAsUser`` the container runs as uid 65534 (a kubelet would use the image's USER;
  running as host root is too dangerous); ``runAsGroup`` defaults to 65534 (0 for uid 0).
  Explicit uid 0 gets Docker's default capabilities. ``no_new_privs`` is on unless
  ``allowPrivilegeEscalation: true``.
* Resources are not enforced; downward-API limits default to the host's capacity.
* The network is the host's: no pod IP (``status.podIP`` is empty), ports are shared, and only the
  ``kubernetes`` service is exported as KUBERNETES_SERVICE_*/KUBERNETES_PORT* (pointing at the real
  apiserver, since there is no kube-proxy).
* Projected service-account tokens are requested once (TokenRequest), never rotated.
* Container logs are raw stdout+stderr in ``<state>/pods/<ns>/<pod>/<container>.log`` (no CRI
  timestamps); the executor's own actions go to ``<state>/executor.log``, never secret values.
* The executor must run as root (it switches each container's uid with setpriv); its state dir
  is hidden from containers, whose view of the host is otherwise the read-only root.
* A termination grace period below 2 s is raised to 2 s (the kubelet's minimum); on executor
  shutdown at most 5 s are granted.

The modules of this package and what each holds are listed in ``tests/harness/README.md``;
this module re-exports what the harness and the tests use.
"""

from __future__ import annotations

from harness.executor.api import ApiError, KubeApi
from harness.executor.downward import HostCapacity, field_value, format_map, resource_value
from harness.executor.env import (
    DEFAULT_PATH,
    container_argv,
    container_environment,
    resolve_env,
    service_env,
)
from harness.executor.expansion import expand
from harness.executor.harness import (
    ExecutorError,
    ExecutorProcess,
    executor_command,
    run_executor,
)
from harness.executor.hostpaths import host_paths_for
from harness.executor.identity import Identity, container_identity
from harness.executor.images import ImageEntry, ImageTable, image_repository
from harness.executor.kubelet import Executor
from harness.executor.objects import ObjectCache
from harness.executor.pod import PodStartError
from harness.executor.podspec import grace_seconds, pod_hostname, unsupported_reason
from harness.executor.processes import main_process
from harness.executor.quantity import parse_quantity
from harness.executor.restarts import History, restart_delay
from harness.executor.status import (
    ContainerInfo,
    backoff_status,
    claimed_status,
    merge_conditions,
    running_status,
    terminated_status,
)
from harness.executor.termination import (
    Termination,
    exit_code_of,
    read_log_tail,
    read_termination_file,
    rejected_termination,
    termination_message,
)
from harness.executor.volumes import (
    FileProjection,
    VolumeDir,
    VolumeSources,
    container_mounts,
    make_empty_dir,
    termination_log_mount,
    write_volume,
)

__all__ = [
    "DEFAULT_PATH",
    "ApiError",
    "ContainerInfo",
    "Executor",
    "ExecutorError",
    "ExecutorProcess",
    "FileProjection",
    "History",
    "HostCapacity",
    "Identity",
    "ImageEntry",
    "ImageTable",
    "KubeApi",
    "ObjectCache",
    "PodStartError",
    "Termination",
    "VolumeDir",
    "VolumeSources",
    "backoff_status",
    "claimed_status",
    "container_argv",
    "container_environment",
    "container_identity",
    "container_mounts",
    "executor_command",
    "exit_code_of",
    "expand",
    "field_value",
    "format_map",
    "grace_seconds",
    "host_paths_for",
    "image_repository",
    "main_process",
    "make_empty_dir",
    "merge_conditions",
    "parse_quantity",
    "pod_hostname",
    "read_log_tail",
    "read_termination_file",
    "rejected_termination",
    "resolve_env",
    "resource_value",
    "restart_delay",
    "run_executor",
    "running_status",
    "service_env",
    "terminated_status",
    "termination_log_mount",
    "termination_message",
    "unsupported_reason",
    "write_volume",
]
