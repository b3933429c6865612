"""PostgreSQL storage of the operator, its only client: execution history, budget grants, the
audit trail and agent state (``history``), with their Alembic migrations (``migrations``)."""
