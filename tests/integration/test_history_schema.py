"""The history schema: the migration and the models agree, upgrade() is safe to run concurrently,
and the queries the operator and CLI run use the indexes (EXPLAIN on 20k rows)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from harness.postgres import PostgresServer, schema_url
from nocturne_operator.notifications.outbox import NOTIFICATIONS
from nocturne_operator.storage import (
    MIGRATIONS_DIR,
    Base,
    Caps,
    ExecutionKey,
    History,
    StatsQuery,
    upgrade,
)

pytestmark = pytest.mark.integration


def all_models() -> sa.MetaData:
    """The history models plus the operator's notification outbox (migration 0002)."""
    models = sa.MetaData()
    for table in [*Base.metadata.tables.values(), NOTIFICATIONS]:
        table.to_metadata(models)
    return models


TABLES = sorted(all_models().tables)


@pytest.fixture
def new_schema(postgres: PostgresServer) -> Iterator[Callable[[], tuple[str, str]]]:
    """Makes empty schemas (name, URL whose search_path starts there); drops them afterwards."""
    admin = sa.create_engine(postgres.url, poolclass=sa.NullPool)
    made: list[str] = []

    def make() -> tuple[str, str]:
        name = f"s_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {name}"))
        made.append(name)
        return name, schema_url(postgres.url, name)

    yield make
    with admin.begin() as conn:
        for name in made:
            conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
    admin.dispose()


def catalog(url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Columns, constraints and indexes of the history tables as PostgreSQL describes them."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    queries = {
        "columns": """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attidentity
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE n.nspname = :schema AND c.relkind = 'r' AND a.attnum > 0
              AND NOT a.attisdropped AND c.relname <> 'alembic_version'
            ORDER BY c.relname, a.attnum""",
        "constraints": """
            SELECT c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
            FROM pg_constraint con
            JOIN pg_class c ON c.oid = con.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = :schema AND c.relname <> 'alembic_version'
            ORDER BY c.relname, con.conname""",
        "indexes": """
            SELECT tablename, indexname, replace(indexdef, schemaname || '.', '')
            FROM pg_indexes
            WHERE schemaname = :schema AND tablename <> 'alembic_version'
            ORDER BY tablename, indexname""",
        "statistics": """
            SELECT stxname, replace(pg_get_statisticsobjdef(oid), :schema || '.', '')
            FROM pg_statistic_ext
            WHERE stxnamespace = CAST(:schema AS regnamespace)
            ORDER BY stxname""",
    }
    with engine.connect() as conn:
        result = {
            what: [tuple(row) for row in conn.execute(sa.text(sql), {"schema": schema})]
            for what, sql in queries.items()
        }
    engine.dispose()
    return result


def alembic_config(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


# ---- migrations and models agree ---------------------------------------------------------------


def test_autogenerate_finds_no_difference_between_models_and_migrations(
    new_schema: Callable[[], tuple[str, str]],
) -> None:
    _, url = new_schema()
    upgrade(url)
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, all_models()) == []
        # The comparison is not vacuous: a model change shows up.
        changed = all_models()
        changed.tables["schedule_events"].append_column(sa.Column("extra", sa.Text))
        assert [d[0] for d in compare_metadata(context, changed)] == ["add_column"]
    engine.dispose()


def test_migrated_catalog_equals_the_models_catalog(
    new_schema: Callable[[], tuple[str, str]],
) -> None:
    """Stricter than autogenerate, which skips CHECK constraints and INCLUDE/WHERE of indexes."""
    migrated, migrated_url = new_schema()
    upgrade(migrated_url)
    modelled, modelled_url = new_schema()
    engine = sa.create_engine(modelled_url, poolclass=sa.NullPool)
    Base.metadata.create_all(engine)  # with its CREATE STATISTICS hook
    NOTIFICATIONS.metadata.create_all(engine)
    engine.dispose()

    from_migration = catalog(migrated_url, migrated)
    from_models = catalog(modelled_url, modelled)
    assert from_migration == from_models
    assert sorted({row[0] for row in from_migration["columns"]}) == TABLES
    indexes = {name: definition for _, name, definition in from_migration["indexes"]}
    assert indexes["ix_schedule_executions_schedule_started"] == (
        "CREATE INDEX ix_schedule_executions_schedule_started ON schedule_executions USING btree "
        "(namespace, schedule_name, started_at DESC, id DESC) INCLUDE (cost_usd, status)"
    )
    assert indexes["ix_schedule_executions_schedule_status_started"].endswith(
        "(namespace, schedule_name, status, started_at DESC, id DESC)"
    )
    assert indexes["ix_schedule_executions_running"].endswith(
        "USING btree (started_at) WHERE (status = 'RUNNING'::text)"
    )
    assert indexes["uq_schedule_executions_job_uid_pod_uid"].endswith("(job_uid, pod_uid)")
    assert indexes["ix_schedule_executions_uid_started"] == (
        "CREATE INDEX ix_schedule_executions_uid_started ON schedule_executions USING btree "
        "(schedule_uid, started_at DESC, id DESC) INCLUDE (cost_usd, status, granted_usd)"
    )
    assert indexes["ix_schedule_executions_uid_running"].endswith(
        "USING btree (schedule_uid, started_at, id) WHERE (status = 'RUNNING'::text)"
    )
    assert from_migration["statistics"] == [
        (
            "st_schedule_executions_schedule",
            "CREATE STATISTICS st_schedule_executions_schedule (ndistinct, dependencies) "
            "ON namespace, schedule_name FROM schedule_executions",
        )
    ]
    # The retention purge reads the oldest rows first; a deleted run's saved state by index.
    assert indexes["ix_schedule_executions_completed"].endswith("USING btree (completed_at)")
    assert indexes["ix_schedule_events_purgeable_at"].endswith(
        "USING btree (at) WHERE ((kind <> 'created'::text) OR (schedule_uid IS NULL))"
    )
    assert indexes["ix_agent_state_execution_id"].endswith("USING btree (execution_id)")
    money = [row for row in from_migration["columns"] if row[1] in ("cost_usd", "granted_usd")]
    assert money == [
        ("schedule_executions", "cost_usd", "numeric(14,6)", True, "0", ""),
        ("schedule_executions", "granted_usd", "numeric(14,6)", False, None, ""),
        ("schedule_purged_totals", "cost_usd", "numeric(14,6)", True, "0", ""),
    ]
    checks = {name: text for _, name, kind, text in from_migration["constraints"] if kind == "c"}
    assert checks["ck_schedule_executions_granted_usd"] == "CHECK ((granted_usd >= (0)::numeric))"


def test_downgrade_removes_everything_and_upgrade_restores_it(
    new_schema: Callable[[], tuple[str, str]],
) -> None:
    schema, url = new_schema()
    upgrade(url)
    upgrade(url)  # idempotent
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        command.downgrade(alembic_config(conn), "base")
        conn.commit()
        assert sa.inspect(conn).get_table_names() == ["alembic_version"]
    engine.dispose()
    upgrade(url)
    assert sorted({row[0] for row in catalog(url, schema)["columns"]}) == TABLES


def test_concurrent_upgrades_are_serialised(
    new_schema: Callable[[], tuple[str, str]],
) -> None:
    schema, url = new_schema()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            barrier.wait()
            upgrade(url)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        head = ScriptDirectory.from_config(alembic_config(conn)).get_current_head()
        assert list(versions) == [head]
        # The lock is released: nobody holds an advisory lock afterwards.
        held = conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))
        assert held.scalar_one() == 0
    engine.dispose()
    assert sorted({row[0] for row in catalog(url, schema)["columns"]}) == TABLES


# ---- the indexes are used -----------------------------------------------------------------------

ROWS = 20_000
SCHEDULES = 8
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def loaded(postgres: PostgresServer) -> Iterator[History]:
    """20k executions over 8 schedules in 2 namespaces (~97 days, 7 min apart), 20 of each
    schedule RUNNING, vacuumed and analysed."""
    schema = f"x_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres.url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = schema_url(postgres.url, schema)
    upgrade(url)
    history = History.connect(url)
    with history.engine.begin() as conn:
        # The test server commits asynchronously; VACUUM can only mark pages all-visible (for
        # index-only scans) once the inserting commit is flushed.
        conn.execute(sa.text("SET LOCAL synchronous_commit = on"))
        conn.execute(
            sa.text(
                """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, completed_at, cost_usd, input_tokens, output_tokens,
                     model, provider, output, granted_usd)
                SELECT 'ns-' || (g % 2), 'sched-' || (g % :schedules), 'suid-' || (g % :schedules),
                       'job-' || g, 'juid-' || (g / 2), 'puid-' || g, g % 2,
                       CASE WHEN g % 1000 < :schedules THEN 'RUNNING'
                            WHEN g % 7 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
                       :t0 + g * interval '7 minutes',
                       CASE WHEN g % 1000 < :schedules THEN NULL
                            ELSE :t0 + g * interval '7 minutes' + interval '1 minute' END,
                       (g % 97) / 1000.0, 1000 + g % 500, 200 + g % 50,
                       'gpt-4o-mini', 'openai', repeat('output ', 20),
                       CASE WHEN g % 3 = 0 THEN 0.1 END
                FROM generate_series(1, :rows) AS g
                """
            ),
            {"schedules": SCHEDULES, "rows": ROWS, "t0": T0},
        )
    with history.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE schedule_executions"))
    yield history
    history.close()
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def explain(
    history: History,
    call: Callable[[History], object],
    pick: Callable[[str], bool] = lambda _: True,
) -> dict[str, Any]:
    """The plan of the last statement ``call`` sent (of those ``pick`` accepts), with the
    parameters it sent."""
    sent: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        sent.append((args[2], args[3]))  # (conn, cursor, statement, parameters, ...)

    sa.event.listen(history.engine, "before_cursor_execute", capture)
    try:
        call(history)
    finally:
        sa.event.remove(history.engine, "before_cursor_execute", capture)
    statement, parameters = [item for item in sent if pick(item[0])][-1]
    with history.engine.connect() as conn:
        result = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        document = result.scalar_one()
    plans = json.loads(document) if isinstance(document, str) else document
    plan: dict[str, Any] = plans[0]["Plan"]
    return plan


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


SINCE = T0 + timedelta(days=30)
UNTIL = T0 + timedelta(days=60)
ACCESS_CASES: list[tuple[str, Callable[[History], object], str, bool]] = [
    # (case, call, index expected on schedule_executions, ordered by the index: no Sort)
    (
        "runs first page",
        lambda h: h.runs("ns-1", "sched-3", limit=50),
        "ix_schedule_executions_schedule_started",
        True,
    ),
    (
        "runs in a window, filtered by status",
        lambda h: h.runs("ns-1", "sched-3", since=SINCE, until=UNTIL, status=["FAILED"]),
        "ix_schedule_executions_schedule_status_started",
        True,
    ),
    (
        "last successful run",
        lambda h: h.runs("ns-0", "sched-6", status="SUCCEEDED", limit=1),
        "ix_schedule_executions_schedule_status_started",
        True,
    ),
    (
        "runs filtered by two statuses",
        lambda h: h.runs("ns-1", "sched-5", status=["FAILED", "TIMED_OUT"], limit=20),
        "",  # either schedule index serves it
        False,
    ),
    (
        "runs next page (keyset)",
        lambda h: h.runs("ns-1", "sched-3", limit=50, before_id=h.runs("ns-1", "sched-3")[-1].id),
        "ix_schedule_executions_schedule_started",
        True,
    ),
    (
        "cost by day in a zone, all time",
        lambda h: h.cost("ns-1", "sched-3", by="day", tz="Asia/Tokyo"),
        "ix_schedule_executions_schedule_started",
        False,
    ),
    (
        "cost by month in a window",
        lambda h: h.cost(
            "ns-0", "sched-2", since=SINCE, until=UNTIL, by="month", tz="Europe/Paris"
        ),
        "ix_schedule_executions_schedule_started",
        False,
    ),
    (
        "total cost",
        lambda h: h.total_cost("ns-0", "sched-4"),
        "ix_schedule_executions_schedule_started",
        False,
    ),
    (
        "spent for a job's attempts",
        lambda h: h.spent_for_job("juid-777"),
        "uq_schedule_executions_job_uid_pod_uid",
        False,
    ),
    (
        "total cost of one incarnation (schedule UID)",
        lambda h: h.total_cost("ns-0", "sched-4", schedule_uid="suid-4"),
        "ix_schedule_executions_uid_started",
        False,
    ),
    (
        "stuck RUNNING rows",
        lambda h: h.stuck_running(timedelta(hours=1)),
        "ix_schedule_executions_running",
        True,
    ),
]


@pytest.mark.parametrize(
    ("call", "index", "ordered"),
    [case[1:] for case in ACCESS_CASES],
    ids=[case[0] for case in ACCESS_CASES],
)
def test_queries_use_the_index(
    loaded: History, call: Callable[[History], object], index: str, ordered: bool
) -> None:
    assert call(loaded) is not None  # the query works on the loaded table
    plan = explain(loaded, call)
    scans = [node for node in nodes(plan) if node.get("Relation Name") == "schedule_executions"]
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), plan
        assert scan["Index Name"] == index or (
            not index and scan["Index Name"].startswith("ix_schedule_executions_schedule_")
        ), plan
    if ordered:
        assert not [n for n in nodes(plan) if n["Node Type"] == "Sort"], plan


def test_cost_query_is_index_only(loaded: History) -> None:
    plan = explain(loaded, lambda h: h.cost("ns-1", "sched-3", by="week", tz="UTC"))
    scans = [node["Node Type"] for node in nodes(plan) if "Relation Name" in node]
    assert scans == ["Index Only Scan"], plan


def scans_by_table(plan: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """(node type, index) of each scan in ``plan``, by table."""
    scans: dict[str, list[tuple[str, str]]] = {}
    for n in nodes(plan):
        if "Relation Name" in n:
            scan = (n["Node Type"], n.get("Index Name", ""))
            scans.setdefault(n["Relation Name"], []).append(scan)
    return scans


def test_uid_cost_and_the_reservation_sums_are_index_only(loaded: History) -> None:
    """A reservation sums a schedule UID's committed spend (cost, or grant while RUNNING, this
    month and ever) from the UID index alone, plus its purged runs' cost by primary key, under
    its lock: it must stay cheap."""
    plan = explain(loaded, lambda h: h.total_cost("ns-1", "sched-3", schedule_uid="suid-3"))
    assert scans_by_table(plan) == {
        "schedule_executions": [("Index Only Scan", "ix_schedule_executions_uid_started")],
        "schedule_purged_totals": [("Index Scan", "pk_schedule_purged_totals")],
    }, plan

    def reserve(h: History) -> object:
        key = ExecutionKey(
            "ns-1", "sched-3", "suid-3", "job-x", f"juid-{uuid.uuid4()}", "puid-x", 0
        )
        caps = Caps(Decimal(1), total=Decimal(10_000), monthly=Decimal(500), month_start=SINCE)
        return h.reserve(key, model="m", provider="offline", started_at=UNTIL, caps=caps)

    def schedule_sum(statement: str) -> bool:
        return "sum(" in statement and "schedule_executions.schedule_uid =" in statement

    plan = explain(loaded, reserve, schedule_sum)
    assert scans_by_table(plan) == {
        "schedule_executions": [("Index Only Scan", "ix_schedule_executions_uid_started")],
        "schedule_purged_totals": [("Index Scan", "pk_schedule_purged_totals")],
    }, plan


def test_run_stats_of_one_incarnation_reads_the_uid_index(loaded: History) -> None:
    # Every attempt of the schedule is ranked per Job: a bitmap scan of the UID index is fine.
    plan = explain(loaded, lambda h: h.run_stats([StatsQuery("suid-3")]))
    used = {n["Index Name"] for n in nodes(plan) if "Index Name" in n}
    assert used == {"ix_schedule_executions_uid_started"}, plan
    assert "Seq Scan" not in {n["Node Type"] for n in nodes(plan)}, plan


def test_running_attempts_of_a_schedule_uid_read_its_partial_index(loaded: History) -> None:
    """With many schedules in flight (here 2000 RUNNING rows of others, rolled back), the
    in-flight attempts of one schedule come from its own slice of the small partial index."""
    sent: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        sent.append((args[2], args[3]))

    sa.event.listen(loaded.engine, "before_cursor_execute", capture)
    try:
        running = loaded.running("suid-3")
    finally:
        sa.event.remove(loaded.engine, "before_cursor_execute", capture)
    assert {r.schedule_uid for r in running} == {"suid-3"}
    assert len(running) >= ROWS // 1000  # and what other tests reserved
    statement, parameters = sent[-1]
    with loaded.engine.connect() as conn:
        conn.execute(
            sa.text(
                """
                INSERT INTO schedule_executions
                    (namespace, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,
                     status, started_at, model, provider, granted_usd)
                SELECT 'ns-9', 'busy-' || g, 'busy-uid-' || g, 'job-' || g, 'busy-juid-' || g,
                       'busy-puid-' || g, 0, 'RUNNING', :t0 + g * interval '1 second', 'm', 'o', 1
                FROM generate_series(1, 2000) AS g
                """
            ),
            {"t0": T0},
        )
        conn.execute(sa.text("ANALYZE schedule_executions"))
        document = conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {statement}", parameters
        ).scalar_one()
        conn.rollback()
    plan = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
    scans = [n for n in nodes(plan) if n.get("Relation Name") == "schedule_executions"]
    assert [n["Index Name"] for n in scans] == ["ix_schedule_executions_uid_running"], plan
    assert not [n for n in nodes(plan) if "Sort" in n["Node Type"]], plan


def test_next_page_seeks_instead_of_skipping(loaded: History) -> None:
    """The keyset condition is an index condition: page 100 costs what page 1 costs."""
    last = loaded.runs("ns-1", "sched-3", limit=1000)[-1].id
    plan = explain(loaded, lambda h: h.runs("ns-1", "sched-3", limit=50, before_id=last))
    (scan,) = [node for node in nodes(plan) if "Index Name" in node]
    assert "ROW(started_at, id) < ROW(" in scan["Index Cond"], plan
    assert "Filter" not in scan, plan
