"""Fixtures shared by the integration tests: a fresh, migrated history schema per test on the
session's PostgreSQL server (``postgres``, tests/conftest.py), and the repository on it. A test
module may define its own ``url`` or ``history`` to set them up otherwise."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from harness.postgres import PostgresServer, schema_url
from nocturne_operator.storage import History, upgrade


@pytest.fixture
def url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, migrated schema for one test (first on the URL's search_path), dropped after."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres.url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        scoped = schema_url(postgres.url, schema)
        upgrade(scoped)
        yield scoped
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def history(url: str) -> Iterator[History]:
    """The history repository on that schema."""
    with History.connect(url) as repo:
        yield repo
