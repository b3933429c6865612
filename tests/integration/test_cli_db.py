"""`nocturne db upgrade`: migrations by command, never implicitly at runner start. `nocturne db
stats`: each table's rows, size and oldest row, with the retention settings."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from nocturne_operator.cli.main import main
from nocturne_operator.storage import Caps, ExecutionKey, History

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


STARTED = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)


def two_runs(url: str) -> None:
    with History.connect(url) as history:
        for job in ("a", "b"):
            key = ExecutionKey("ns", "digest", "uid", f"digest-{job}", f"juid-{job}", "pod", 0)
            grant = history.reserve(
                key, model="m", provider="offline", started_at=STARTED, caps=Caps(Decimal(1))
            )
            history.finish(
                grant.execution_id,
                status=RunOutcome.SUCCEEDED,
                completed_at=STARTED,
                cost_usd=Decimal("0.01"),
                input_tokens=1,
                output_tokens=1,
            )
        history.record_event("ns", "digest", "paused", at=STARTED)


def test_stats_show_rows_size_oldest_row_and_retention(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = postgres.fresh_schema("cli_db_stats")
    assert main(["db", "upgrade", "--database-url", url]) == 0
    two_runs(url)
    config = tmp_path / "settings.yaml"
    config.write_text("history_retention_days: 90\naudit_retention_days: 0\n")
    capsys.readouterr()

    # Never analysed: PostgreSQL has no estimate, so the rows are counted.
    assert main(["--config", str(config), "db", "stats", "--database-url", url, "-o", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    tables = {t["name"]: t for t in document["tables"]}
    assert "alembic_version" not in tables
    assert tables["schedule_executions"] == {
        "name": "schedule_executions",
        "rows": 2,
        "rowsEstimated": False,
        "totalBytes": tables["schedule_executions"]["totalBytes"],
        "oldest": "2026-03-04T05:06:00+00:00",
        "retentionDays": 90,
    }
    assert tables["schedule_executions"]["totalBytes"] > 0
    assert tables["schedule_events"]["retentionDays"] == 0
    assert tables["schedule_purged_totals"]["retentionDays"] == 0  # never purged
    assert tables["agent_state"]["retentionDays"] is None
    assert document["retention"] == {
        "historyDays": 90,
        "auditDays": 0,
        "notificationDays": 30,
        "batchSize": 500,
    }

    # Analysed: the estimate, marked as one.
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE schedule_executions"))
        conn.commit()
    engine.dispose()
    assert main(["--config", str(config), "db", "stats", "--database-url", url]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["TABLE"] == ["TABLE", "ROWS", "SIZE", "OLDEST", "(UTC)", "KEPT"]
    row = lines["schedule_executions"]
    assert row[1] == "~2"
    assert row[2].replace(".", "").isdigit()
    assert row[3] in ("KiB", "MiB")
    assert row[4:] == ["2026-03-04", "05:06", "90", "days"]
    assert lines["schedule_events"][1:2] == ["1"]
    assert lines["schedule_events"][-1] == "forever"
    assert "runs 90 days after they ended (their totals kept), audit rows forever" in out


def test_stats_of_an_unreachable_database_keep_the_password_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://nocturne:hunter2-secret@127.0.0.1:{port}/nocturne"
    assert main(["db", "stats", "--database-url", url]) == 1
    out = capsys.readouterr().out
    assert out.startswith("db stats: ")
    assert "hunter2-secret" not in out
