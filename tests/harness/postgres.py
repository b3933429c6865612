"""A private PostgreSQL server for tests: ``initdb`` in a temporary directory, a free loopback
port, a password-protected role, torn down at the end. No reliance on a server started by hand.

Debian's ``postgresql`` package provides the binaries (``make setup`` installs it when missing).
PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

DATABASE = "nocturne"
ROLE = "nocturne"


class PostgresError(RuntimeError):
    """The server binaries are missing or the server failed to start."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server; ``url`` is a SQLAlchemy URL for the psycopg 3 driver."""

    host: str
    port: int
    database: str
    user: str
    password: str
    data_dir: Path

    @property
    def url(self) -> str:
        """``postgresql+psycopg://`` URL of the test database."""
        return (
            f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{self.database}"
        )

    def fresh_schema(self, name: str) -> str:
        """(Re)create schema ``name`` and return a URL whose search_path is that schema, so
        tests sharing the server do not see each other's tables."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"schema {name!r}: lowercase letters, digits and _ only")
        engine = sa.create_engine(self.url, poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
                conn.execute(sa.text(f"CREATE SCHEMA {name}"))
        finally:
            engine.dispose()
        return f"{self.url}?options=-csearch_path%3D{name}"

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self.data_dir.parent / "postgres.log"

    def stop(self) -> None:
        """Stop the server and keep its files: ``start()`` brings the same data back on the same
        port (to test clients through an outage). A no-op when it is not running."""
        _pg_ctl_stop(self.data_dir)

    def start(self) -> None:
        """Start the server again after ``stop()``: same data directory, same port."""
        _pg_ctl_start(self)


def bin_dir() -> Path:
    """Directory of initdb/pg_ctl: the newest ``/usr/lib/postgresql/*/bin`` or one on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise PostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; run `make setup` "
        "(installs Debian's postgresql package)"
    )


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throw-away server and yield it; stop it and delete its files on exit."""
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server.data_dir)


def stop_postgres(data_dir: Path) -> None:
    """Stop the server of ``data_dir`` (if running) and delete all its files."""
    _pg_ctl_stop(data_dir)
    shutil.rmtree(data_dir.parent, ignore_errors=True)


def _run_as() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_ctl_stop(data_dir: Path) -> None:
    if (data_dir / "postmaster.pid").exists():
        subprocess.run(
            [
                *_run_as(),
                str(bin_dir() / "pg_ctl"),
                "-D",
                str(data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ],
            capture_output=True,
            check=False,
        )


def _pg_ctl_start(server: PostgresServer) -> None:
    root = server.data_dir.parent
    options = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} "
        # Test data is disposable: durability only costs time.
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=100 -c timezone=UTC"
    )
    _run(
        [
            *_run_as(),
            str(bin_dir() / "pg_ctl"),
            "-D",
            str(server.data_dir),
            "-l",
            str(server.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        "pg_ctl start",
        log=server.log_file,
    )


def start_postgres() -> PostgresServer:
    """Start a private server (initdb in a new temporary directory, a free port, a role with a
    random password); the caller stops it with ``stop_postgres(server.data_dir)``."""
    bindir = bin_dir()
    # Not under pytest's 0700 tmp tree: the `postgres` user must be able to reach its files.
    root = Path(tempfile.mkdtemp(prefix="nocturne-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data_dir = root / "data"
    password = secrets.token_urlsafe(24)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    pwfile.chmod(0o600)
    port = _free_port()
    server = PostgresServer("127.0.0.1", port, DATABASE, ROLE, password, data_dir)
    try:
        _run(
            [
                *run_as,
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            "initdb",
        )
        pwfile.unlink()
        _pg_ctl_start(server)
        # Two -c options: CREATE DATABASE cannot share a transaction with other statements.
        _run(
            [
                *run_as,
                str(bindir / "psql"),
                "-h",
                str(root),
                "-p",
                str(port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'",
                "-c",
                f"CREATE DATABASE {DATABASE} OWNER {ROLE}",
            ],
            "create role and database",
        )
    except BaseException:
        stop_postgres(data_dir)
        raise
    return server


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/")
    if result.returncode != 0:
        detail = result.stderr or result.stdout
        if log is not None and log.exists():
            detail += "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise PostgresError(f"{what} failed (exit {result.returncode}):\n{detail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on the search_path (tables and alembic_version go there)."""
    parsed = sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return parsed.render_as_string(hide_password=False)
