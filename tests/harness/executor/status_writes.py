"""Writing a pod's status: GET the pod, build the document from it, PATCH it guarded by the
pod's resourceVersion, and retry conflicts and transient errors for a bounded time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from harness.executor.api import ApiError, KubeApi
from harness.executor.pod import JSON, PodKey, get_map, get_text

log = logging.getLogger("nocturne.executor")


def write_pod_status(
    api: KubeApi, key: PodKey, build: Callable[[JSON], JSON], *, give_up_after: float
) -> bool:
    """GET the pod, build the status from it, PATCH with its resourceVersion; retry on
    conflicts and transient errors (for ``give_up_after`` seconds). False if the pod is gone
    or replaced."""
    deadline = time.monotonic() + give_up_after
    delay = 0.2
    while True:
        error: ApiError | None = None
        try:
            written = _try_write(api, key, build)
        except ApiError as exc:
            error = exc
        if error is None:
            return written
        if error.status == 409:  # someone else wrote: rebuild from the fresh object
            continue
        if error.status == 404:
            return False
        if error.status in (400, 403, 422):
            log.error("%s: status write rejected: %s", key, error)
            return False
        if time.monotonic() > deadline:
            log.error("%s: giving up on a status write: %s", key, error)
            return False
        log.warning("%s: status write failed (%s); retrying", key, error)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _try_write(api: KubeApi, key: PodKey, build: Callable[[JSON], JSON]) -> bool:
    pod = api.get_pod(key.namespace, key.name)
    if pod is None or get_text(get_map(pod, "metadata"), "uid") != key.uid:
        log.info("%s: pod gone or replaced; status not written", key)
        return False
    meta = get_map(pod, "metadata")
    body = {
        # A stale resourceVersion makes the apiserver answer 409 instead of overwriting.
        "metadata": {"resourceVersion": get_text(meta, "resourceVersion")},
        "status": build(pod),
    }
    api.patch_pod_status(key.namespace, key.name, body)
    return True
