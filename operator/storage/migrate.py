"""Migrations of the history schema: ``upgrade()`` runs the Alembic scripts in ``migrations/``
(there is no alembic.ini) under an advisory lock, so every replica and ``nocturne db upgrade``
may call it at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

from nocturne_operator.storage.engine import (
    HistoryError,
    create_engine,
    redact_url,
    translate_errors,
)

__all__ = ["MIGRATIONS_DIR", "upgrade"]

log = logging.getLogger(__name__)

# Shipped as the packages nocturne_operator.storage.migrations(.versions) plus
# script.py.mako (pyproject);
# resolve() also finds them through the strict editable install's symlink tree.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_lock key serialising concurrent `upgrade()` calls on one database ("noct" + "hist").
_MIGRATION_LOCK_KEY = 0x6E6F6374_68697374


def upgrade(url: str, revision: str = "head", *, connect_timeout: int = 10) -> None:
    """Migrate the history schema to ``revision``; safe to run concurrently (advisory lock).

    Tables and Alembic's version table go to the first schema of the connection's search_path.
    """
    from alembic import command  # noqa: PLC0415 - only migrations need Alembic
    from alembic.config import Config  # noqa: PLC0415

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise HistoryError(
            f"history migrations not found at {MIGRATIONS_DIR}: operator/storage/migrations "
            "must be "
            "installed as package data"
        )
    engine = create_engine(
        url,
        connect_timeout=connect_timeout,
        statement_timeout_ms=None,
        application_name="nocturne-migrate",
        pool=False,
    )
    lock = sa.text("SELECT pg_advisory_lock(:key)").bindparams(key=_MIGRATION_LOCK_KEY)
    unlock = sa.text("SELECT pg_advisory_unlock(:key)").bindparams(key=_MIGRATION_LOCK_KEY)
    try:
        with (
            translate_errors(f"migrate history to {revision}", engine.url),
            engine.connect() as conn,
        ):
            conn.execute(lock)
            conn.commit()
            try:
                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS_DIR))
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
            finally:
                conn.rollback()
                conn.execute(unlock)
                conn.commit()
        log.info("history schema of %s at %s", redact_url(engine.url), revision)
    finally:
        engine.dispose()
