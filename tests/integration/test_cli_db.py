"""`nocturne db upgrade`: migrations by command, never implicitly at runner start."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from harness.postgres import PostgresServer
from nocturne_operator.cli.main import main

pytestmark = pytest.mark.integration


def tables(url: str, schema: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names(schema=schema))
    finally:
        engine.dispose()


def test_upgrade_creates_the_schema_and_is_idempotent(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = postgres.fresh_schema("cli_db")
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert {"schedule_executions", "schedule_events", "agent_state"} <= tables(url, "cli_db")
    assert main(["db", "upgrade", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "is at the latest schema" in out
    assert postgres.password not in out


def test_url_from_the_environment(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.fresh_schema("cli_db_env")
    monkeypatch.setenv("NOCTURNE_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 0
    assert "schedule_executions" in tables(url, "cli_db_env")


def test_unreachable_database_fails_without_leaking_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://nocturne:hunter2-secret@127.0.0.1:{port}/nocturne"
    assert main(["db", "upgrade", "--database-url", url]) == 1
    out = capsys.readouterr().out
    assert out.startswith("db upgrade failed: ")
    assert "hunter2-secret" not in out


def test_missing_url_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOCTURNE_DATABASE_URL", raising=False)
    assert main(["db", "upgrade"]) == 2
    assert "no database URL" in capsys.readouterr().out


def test_success_line_hides_a_password_given_as_a_query_parameter(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The migration Job prints this line: a ?password= URL used to show the password in it."""
    url = postgres.fresh_schema("cli_db_query").replace(
        f"{postgres.user}:{postgres.password}@", f"{postgres.user}@"
    )
    url += f"&password={postgres.password}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "is at the latest schema" in out
    assert postgres.password not in out
    assert "password=***" in out
