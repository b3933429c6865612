"""`nocturne history` and `nocturne cost` on a seeded table of 100k executions."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from harness.postgres import PostgresServer
from nocturne_operator.cli.main import main
from nocturne_operator.storage import upgrade

pytestmark = pytest.mark.integration
ROWS = 100_000


@pytest.fixture(scope="module")
def seeded(postgres: PostgresServer) -> str:
    """100k runs of ten schedules over 2026, one run every ~5 minutes, every 10th failed."""
    url = postgres.fresh_schema("cli_reports")
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("""
            INSERT INTO schedule_executions (namespace, schedule_name, schedule_uid, job_name,
                job_uid, pod_uid, attempt, status, started_at, completed_at, cost_usd,
                input_tokens, output_tokens, model, provider, error)
            SELECT 'research', 'news-' || (i % 10), 'uid', 'job-' || i, 'job-uid-' || i,
                'pod-uid-' || i, 0,
                CASE WHEN i % 10 = 3 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                timestamptz '2026-01-01 00:00:00+00' + (i * interval '5 minutes'),
                timestamptz '2026-01-01 00:01:00+00' + (i * interval '5 minutes'),
                0.010000, 100, 50, 'gpt-4o-mini', 'openai',
                CASE WHEN i % 10 = 3 THEN 'provider said no' END
            FROM generate_series(1, :rows) AS i
        """),
            {"rows": ROWS},
        )
        conn.execute(sa.text("ANALYZE schedule_executions"))
    engine.dispose()
    return url


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    code = main(list(args))
    return code, capsys.readouterr().out, time.perf_counter() - started


def test_history_pages_through_a_large_table(
    seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, seconds = run_cli(
        capsys,
        "history",
        "news-3",
        "-n",
        "research",
        "--limit",
        "20",
        "-o",
        "json",
        "--database-url",
        seeded,
    )
    assert code == 0
    page = json.loads(out)
    assert len(page["runs"]) == 20
    assert all(r["status"] == "FAILED" for r in page["runs"])  # i % 10 == 3
    assert page["runs"][0]["startedAt"] > page["runs"][-1]["startedAt"]
    code, out, _ = run_cli(
        capsys,
        "history",
        "news-3",
        "-n",
        "research",
        "--limit",
        "20",
        "-o",
        "json",
        "--before-id",
        str(page["nextBeforeId"]),
        "--database-url",
        seeded,
    )
    second = json.loads(out)
    assert {r["id"] for r in second["runs"]}.isdisjoint({r["id"] for r in page["runs"]})
    assert second["runs"][0]["startedAt"] < page["runs"][-1]["startedAt"]
    print(f"history page over {ROWS} rows: {seconds * 1000:.0f} ms")


def test_history_filters_and_table(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys,
        "history",
        "news-1",
        "-n",
        "research",
        "--status",
        "failed",
        "--since",
        "2026-02-01",
        "--database-url",
        seeded,
    )
    assert code == 0
    assert out.startswith("no runs of research/news-1")
    code, out, _ = run_cli(
        capsys,
        "history",
        "news-1",
        "-n",
        "research",
        "--limit",
        "3",
        "--until",
        "2026-01-02T00:00:00Z",
        "--database-url",
        seeded,
    )
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STARTED", "(UTC)"]
    assert len(lines) == 5  # header, three rows, the next-page hint
    assert lines[-1].startswith("more: --before-id ")


def test_cost_by_month(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, seconds = run_cli(
        capsys,
        "cost",
        "news-0",
        "-n",
        "research",
        "--by",
        "month",
        "-o",
        "json",
        "--database-url",
        seeded,
    )
    assert code == 0
    report = json.loads(out)
    assert report["periods"][0]["start"].startswith("2026-01-01")
    assert report["totalUSD"] == "100.00"  # 10,000 runs of 0.01
    print(f"cost by month over {ROWS} rows: {seconds * 1000:.0f} ms")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["history", "x", "--since", "yesterday"], "--since 'yesterday': not an ISO 8601"),
        (["history", "x", "--status", "EXPLODED"], "--status 'EXPLODED': expected one of"),
        (["cost", "x", "--tz", "Mars/Base"], "--tz 'Mars/Base': not an IANA zone"),
    ],
)
def test_bad_flags(
    seeded: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, _ = run_cli(capsys, *args, "--database-url", seeded)
    assert code == 2
    assert message in out


def test_history_lists_every_incarnation_with_its_uid(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schedule deleted and re-created under its name is a new schedule (totals of its own),
    but `nocturne history NAME` lists the runs of both, each with its schedule's UID."""
    url = postgres.fresh_schema("cli_incarnations")
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for i, uid in enumerate(("0ld0ld00-0000-4000-8000-000000000001", "new0new0-0000-4000")):
            conn.execute(
                sa.text("""
                INSERT INTO schedule_executions (namespace, schedule_name, schedule_uid,
                    job_name, job_uid, pod_uid, attempt, status, started_at, completed_at,
                    cost_usd, model, provider)
                VALUES ('research', 'digest', :uid, :job, :job, :job, 0, 'SUCCEEDED',
                    timestamptz '2026-11-01 09:00+00' + :i * interval '1 day',
                    timestamptz '2026-11-01 09:01+00' + :i * interval '1 day',
                    0.25, 'gpt-4o-mini', 'openai')
            """),
                {"uid": uid, "job": f"digest-{i}", "i": i},
            )
    engine.dispose()
    args = ("history", "digest", "-n", "research", "--database-url", url)
    code, out, _ = run_cli(capsys, *args, "-o", "json")
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [(r["job"], r["scheduleUID"]) for r in runs] == [
        ("digest-1", "new0new0-0000-4000"),
        ("digest-0", "0ld0ld00-0000-4000-8000-000000000001"),
    ]
    code, out, _ = run_cli(capsys, *args)
    header, *rows = out.splitlines()
    assert "UID" in header.split()
    assert [row.split()[7] for row in rows] == ["new0new0", "0ld0ld00"]  # date and time: 2
