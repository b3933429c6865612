"""The watch loop: list unbound pods, then watch them from the list's resourceVersion, with
back-off on errors and a fresh list when the resourceVersion expires."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from harness.executor.api import ApiError, KubeApi, WatchStream
from harness.executor.pod import JSON, get_map, get_text

log = logging.getLogger("nocturne.executor")


class PodWatch:
    """A thread that hands every full list of unbound pods to ``resync`` and every later event to
    ``observe(kind, pod)``, until ``stopping`` is set and ``stop`` is called."""

    FIELD_SELECTOR = "spec.nodeName="

    def __init__(
        self,
        api: KubeApi,
        stopping: threading.Event,
        observe: Callable[[str, JSON], None],
        resync: Callable[[Sequence[JSON]], None],
    ) -> None:
        self.api = api
        self._stopping = stopping
        self._observe = observe
        self._resync = resync
        self.synced = threading.Event()  # set once the first list has been handled
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._loop, name="executor-watch")

    def start(self) -> None:
        """Start the watch thread."""
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Interrupt the current watch (``stopping`` must be set) and wait for the thread."""
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        backoff = 0.5
        rv = ""
        while not self._stopping.is_set():
            try:
                if not rv:
                    items, rv = self.api.list_pods(self.FIELD_SELECTOR)
                    self._resync(items)
                    self.synced.set()
                    log.info("listed %d unbound pod(s) at resourceVersion %s", len(items), rv)
                stream = self.api.watch_pods(self.FIELD_SELECTOR, rv, timeout=300)
                with self._lock:
                    self._stream = stream
                if self._stopping.is_set():
                    stream.close()
                for event in stream:
                    rv = self._on_event(event, rv)
                    backoff = 0.5
            except ApiError as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    log.info("watch: resourceVersion %s expired, re-listing", rv)
                    rv = ""
                    continue
                log.warning("watch: %s; retrying in %.1f s", exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                log.exception("watch: unexpected error; re-listing")
                rv = ""
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with self._lock:
                    self._stream = None

    def _on_event(self, event: JSON, rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return rv
        if kind == "ERROR":
            code = obj.get("code")
            raise ApiError(code if isinstance(code, int) else None, f"watch error: {obj}")
        new_rv = get_text(get_map(obj, "metadata"), "resourceVersion") or rv
        if kind == "BOOKMARK":
            return new_rv
        try:
            self._observe(str(kind), obj)
        except Exception:
            log.exception("observe: unexpected error for %s", obj.get("metadata", {}).get("name"))
        return new_rv
