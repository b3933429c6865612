"""The PostgreSQL fixture gives a real, private server."""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa

from harness.postgres import PostgresServer

pytestmark = pytest.mark.integration


def test_create_table_write_and_read_a_row(postgres: PostgresServer) -> None:
    engine = sa.create_engine(postgres.url)
    metadata = sa.MetaData()
    runs = sa.Table(
        "fixture_probe",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cost_usd", sa.Numeric(12, 6), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(runs.insert().values(id=1, cost_usd=Decimal("0.410001")))
        with engine.connect() as conn:
            row = conn.execute(sa.select(runs)).one()
            version = conn.execute(sa.text("SHOW server_version")).scalar_one()
        assert row.id == 1
        assert row.cost_usd == Decimal("0.410001")  # NUMERIC round-trips exactly
        assert row.at.tzinfo is not None
        assert int(str(version).split(".")[0]) >= 13
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def test_server_is_private_and_password_protected(postgres: PostgresServer) -> None:
    wrong = sa.create_engine(postgres.url.replace(postgres.password, "wrong-password"))
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        wrong.connect().close()
    wrong.dispose()
    assert postgres.host == "127.0.0.1"
    assert postgres.port != 5432
