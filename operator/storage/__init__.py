"""PostgreSQL storage of the operator, its only client: execution history, budget grants, the
audit trail, agent state and run checkpoints, split by concern. Import from this package, not
its modules.

- ``schema``: the tables (SQLAlchemy models) and EventKind; a run's outcome is the contract's
  RunOutcome. The leaf.
- ``values``: what the store accepts (money, tokens, aware times, page sizes, storable text).
- ``engine``: the engine, the HistoryError family and the transaction base of the repository.
- ``migrate``: ``upgrade()``, running the Alembic scripts in ``migrations/``.
- ``runs``: writes of run records -- reserve (budget grants), start, record_progress, finish.
- ``queries``: reads of run records -- runs, cost, run statistics, RUNNING attempts.
- ``audit``: the lifecycle audit trail. ``state``: agent state between runs.
- ``checkpoints``: a Job's conversation after its last completed step, for its retry.
- ``pages``: pages of runs, the history's version and changes since one (the agentruns API).
- ``retention``: purges of old runs (their totals kept) and audit rows; the tables' sizes.
- ``repository``: ``History``, the one repository object, composed of the concerns' mixins.

The notifications outbox (migration 0002) lives in ``nocturne_operator.notifications.outbox``.
"""

from agent_runner.contract import (
    STATE_LIMIT_BYTES,
    STATE_OUTPUT_LIMIT_BYTES,
    StateTooLargeError,
    quantize_usd,
    validate_state,
)
from nocturne_operator.storage.audit import EventRecord
from nocturne_operator.storage.budgets import NamespaceBudgetRow
from nocturne_operator.storage.engine import (
    ExecutionNotFoundError,
    HistoryError,
    HistoryUnavailableError,
    redact_url,
    translate_errors,
)
from nocturne_operator.storage.migrate import MIGRATIONS_DIR, upgrade
from nocturne_operator.storage.pages import RunFilter
from nocturne_operator.storage.queries import (
    FAILED_OUTCOMES,
    CostBy,
    CostPeriod,
    ExecutionRecord,
    RunStats,
    StatsQuery,
    month_start,
    next_month_start,
)
from nocturne_operator.storage.repository import History
from nocturne_operator.storage.retention import TableStats
from nocturne_operator.storage.runs import Caps, ExecutionKey, GrantRecord
from nocturne_operator.storage.schema import (
    AgentState,
    Base,
    Event,
    EventKind,
    Execution,
    PurgedTotals,
)
from nocturne_operator.storage.state import SavedState, StateToSave
from nocturne_operator.storage.values import ERROR_LIMIT_BYTES, OUTPUT_LIMIT_BYTES, clean_text

__all__ = [
    "ERROR_LIMIT_BYTES",
    "FAILED_OUTCOMES",
    "MIGRATIONS_DIR",
    "OUTPUT_LIMIT_BYTES",
    "STATE_LIMIT_BYTES",
    "STATE_OUTPUT_LIMIT_BYTES",
    "AgentState",
    "Base",
    "Caps",
    "CostBy",
    "CostPeriod",
    "Event",
    "EventKind",
    "EventRecord",
    "Execution",
    "ExecutionKey",
    "ExecutionNotFoundError",
    "ExecutionRecord",
    "GrantRecord",
    "History",
    "HistoryError",
    "HistoryUnavailableError",
    "NamespaceBudgetRow",
    "PurgedTotals",
    "RunFilter",
    "RunStats",
    "SavedState",
    "StateToSave",
    "StateTooLargeError",
    "StatsQuery",
    "TableStats",
    "clean_text",
    "month_start",
    "next_month_start",
    "quantize_usd",
    "redact_url",
    "translate_errors",
    "upgrade",
    "validate_state",
]
