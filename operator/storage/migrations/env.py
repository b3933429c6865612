"""Alembic environment of the history schema.

Run through ``nocturne_operator.storage.upgrade(url)``, which holds an advisory lock and
passes its connection in ``config.attributes["connection"]``; there is no alembic.ini.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")

if context.is_offline_mode():
    # `alembic upgrade --sql`: render the DDL for a DBA to review and apply.
    context.configure(dialect_name="postgresql", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif connection is None:
    raise RuntimeError(
        "history migrations run through nocturne_operator.storage.upgrade(url), "
        "which supplies the connection"
    )
else:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
