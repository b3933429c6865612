"""Session fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.postgres import PostgresServer, running_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (initdb in a temp dir, free port)."""
    with running_postgres() as server:
        yield server
