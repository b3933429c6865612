"""Measure the agentruns API (issue 17): ``list`` (limit 50) and ``get`` over a large history.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/agentruns_api.py [rows] [repeats]
Starts a private PostgreSQL, migrates it, and serves the agentruns API in this process (the
operator's aiohttp app over TLS, behind a front-proxy client certificate of a CA made here, as the
kube-apiserver would connect). Loads 10,000 runs (the baseline) and then up to ``rows`` (default
1,000,000: 100 schedules in 10 namespaces, one run a minute each), VACUUM ANALYZE, and times each
request end to end over HTTPS (p50 and p99 of ``repeats``): a namespace's newest 50, a schedule's
newest 50, its failed runs, the middle page of the namespace's history (a continue token: page 10
at the baseline, page 1,000 at a million), and one run with its output. The ratio is the same
request at ``rows`` over at the baseline's 10,000 in the same run: near 1 means the cost does
not grow with the history. Access reviews are answered here (the
SubjectAccessReview round trip is the apiserver's and is cached 10 s by the server).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness.controlplane import free_ports
from harness.postgres import running_postgres
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.runsapi import server
from nocturne_operator.runsapi.auth import AccessReviews, FrontProxy
from nocturne_operator.runsapi.changes import RunChanges
from nocturne_operator.storage import History, upgrade

NAMESPACES = 10
SCHEDULES = 100
BASELINE_ROWS = 10_000
PAGE = 50


CHUNK = 50_000  # rows per statement: each stays within the engine's statement timeout


def load(history: History, first: int, last: int) -> None:
    """Runs ``first``..``last``: schedule g % 100 in namespace g % 10, one a minute back."""
    for start in range(first, last + 1, CHUNK):
        _load(history, start, min(last, start + CHUNK - 1))
    with history.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE schedule_executions"))


def _load(history: History, first: int, last: int) -> None:
    with history.engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL synchronous_commit = on"))
        conn.execute(
            sa.text(
                """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, completed_at, cost_usd, input_tokens, output_tokens,
                     model, provider, output)
                SELECT 'ns-' || (g % :namespaces), 'sched-' || (g % :schedules),
                       'suid-' || (g % :schedules), 'job-' || g, 'juid-' || g, 'puid-' || g, 0,
                       CASE WHEN g % 11 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                       now() - g * interval '1 minute',
                       now() - g * interval '1 minute' + interval '2 minutes',
                       (g % 997) / 1000.0, 2000, 300, 'gpt-4o-mini', 'openai',
                       repeat('digest line ', 40)
                FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
                """
            ),
            {"namespaces": NAMESPACES, "schedules": SCHEDULES, "first": first, "last": last},
        )


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def front_proxy_client(directory: Path) -> tuple[str, Path, Path]:
    """A request-header CA (PEM) and a front-proxy-client certificate and key (files)."""
    ca, ca_key = _ca("bench-front-proxy-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "front-proxy-client")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "client.crt", directory / "client.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca.public_bytes(serialization.Encoding.PEM).decode(), cert_file, key_file


@contextmanager
def serving(history: History, directory: Path) -> Iterator[httpx.Client]:
    """The agentruns API on loopback, and a client that connects as the front proxy does."""
    ca_pem, cert_file, key_file = front_proxy_client(directory)
    proxy = FrontProxy(client_ca=ca_pem, allowed_names=("front-proxy-client",))
    tls = RunApiTls.create(["localhost", "127.0.0.1"])
    context = tls.server_context()
    proxy.trust(context)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        done: Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        return done.result(timeout=60)

    async def start() -> Any:
        changes = RunChanges(None)
        app = server.make_app(
            history=history,
            front_proxy=lambda: proxy,
            reviews=AccessReviews(lambda *_: (True, "")),
            changes=changes,
        )
        return await server.serve(app, "127.0.0.1", port, context)

    [port] = free_ports(1)
    runner = run(start())
    ca_file = directory / "server-ca.crt"
    ca_file.write_text(tls.ca_pem)
    client_context = ssl.create_default_context(cafile=str(ca_file))
    client_context.load_cert_chain(cert_file, key_file)
    client = httpx.Client(
        base_url=f"https://127.0.0.1:{port}",
        verify=client_context,
        headers={"X-Remote-User": "bench", "X-Remote-Group": "system:authenticated"},
        timeout=30,
    )
    try:
        yield client
    finally:
        client.close()
        run(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    call()  # warm: connection, plan cache
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


BASE = "/apis/runs.nocturne.dev/v1alpha1/namespaces"


def requests(client: httpx.Client, rows: int) -> dict[str, Callable[[], Any]]:
    def ok(path: str, params: dict[str, str] | None = None) -> Any:
        response = client.get(path, params=params)
        response.raise_for_status()
        return response.json()

    # The middle page of a namespace's history: follow the tokens once, time the last request.
    params: dict[str, str] = {"limit": str(PAGE)}
    for _ in range(rows // NAMESPACES // PAGE // 2 - 1):
        token = ok(f"{BASE}/ns-3/agentruns", params)["metadata"]["continue"]
        params = {"limit": str(PAGE), "continue": token}
    deep = dict(params)
    one = ok(f"{BASE}/ns-3/agentruns", {"limit": "1"})["items"][0]["metadata"]["name"]
    schedule = {"limit": str(PAGE), "labelSelector": "nocturne.dev/schedule=sched-13"}
    failed = {
        **schedule,
        "labelSelector": "nocturne.dev/schedule=sched-13,nocturne.dev/result=Failed",
    }
    return {
        "list namespace, newest 50": lambda: ok(f"{BASE}/ns-3/agentruns", {"limit": str(PAGE)}),
        "list schedule, newest 50": lambda: ok(f"{BASE}/ns-3/agentruns", schedule),
        "list schedule, failed 50": lambda: ok(f"{BASE}/ns-3/agentruns", failed),
        "list namespace, middle page": lambda: ok(f"{BASE}/ns-3/agentruns", deep),
        "get one run (with output)": lambda: ok(f"{BASE}/ns-3/agentruns/{one}"),
    }


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    figures: dict[int, dict[str, tuple[float, float]]] = {}
    with (
        running_postgres() as postgres,
        tempfile.TemporaryDirectory() as scratch,
    ):
        url = postgres.fresh_schema("agentruns_bench")
        upgrade(url)
        with History.connect(url) as history:
            loaded = 0
            for size in (BASELINE_ROWS, rows):
                began = time.perf_counter()
                load(history, loaded + 1, size)
                print(f"loaded {size:,} runs ({time.perf_counter() - began:.1f} s)", flush=True)
                loaded = size
                with serving(history, Path(scratch)) as client:
                    figures[size] = {
                        name: timed(call, repeats) for name, call in requests(client, size).items()
                    }
    base, big = figures[BASELINE_ROWS], figures[rows]
    print(f"\nagentruns API over HTTPS, p50/p99 in ms ({repeats} requests each)")
    print(f"{'request':30} {'10,000 rows':>16} {f'{rows:,} rows':>18} {'ratio p50':>10}")
    for name in base:
        (b50, b99), (r50, r99) = base[name], big[name]
        print(f"{name:30} {b50:7.2f} /{b99:7.2f} {r50:8.2f} /{r99:8.2f} {r50 / b50:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
