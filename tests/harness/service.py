"""A Service's stand-in on loopback: one TCP port in front of several backend ports, for tests
of a Deployment's replicas run as local processes (no kube-proxy here; pods share the host network).

Each new connection goes to the next backend in turn, as kube-proxy spreads connections over a
Service's endpoints; a backend that refuses the connection (its process is gone, or it stopped
listening while shutting down) is skipped, as kube-proxy stops sending to an endpoint whose pod
is not ready. An established connection stays with its backend: when the backend dies, the
client's connection breaks too, as it would in a cluster.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Iterable

__all__ = ["ServiceProxy"]

_CONNECT_TIMEOUT = 1.0
_CHUNK = 65536


class ServiceProxy:
    """Listen on 127.0.0.1:``port`` (``port`` 0: a free one) and forward to ``backends``."""

    def __init__(self, backends: Iterable[int], port: int = 0) -> None:
        self._backends = list(backends)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ServiceProxy:
        thread = threading.Thread(target=self._accept, name="service-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_backends(self, backends: Iterable[int]) -> None:
        """The endpoints from now on (connections already made stay where they are)."""
        with self._lock:
            self._backends = list(backends)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _backend(self) -> socket.socket | None:
        with self._lock:
            backends = list(self._backends)
            start = next(self._turn)
        for offset in range(len(backends)):
            port = backends[(start + offset) % len(backends)]
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=_CONNECT_TIMEOUT)
            except OSError:
                continue
        return None

    def _serve(self, client: socket.socket) -> None:
        backend = self._backend()
        if backend is None:
            client.close()
            return
        with self._lock:
            self.connections += 1
        backend.settimeout(None)
        threading.Thread(target=_pump, args=(backend, client), daemon=True).start()
        _pump(client, backend)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either side ends; then end both."""
    try:
        while chunk := source.recv(_CHUNK):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
