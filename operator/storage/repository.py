"""``History``, the one repository object callers hold: the union of each concern's methods.

Each concern is a mixin on ``engine.Repository`` (the engine and its short-transaction
``_begin``), kept in the module named for it -- ``runs`` (writes), ``queries`` (reads),
``pages``, ``audit``, ``state``, ``checkpoints``, ``retention``, ``budgets`` -- and ``History`` only
composes them. Mixins rather than thin methods delegating to per-concern functions: the methods
keep their signatures and docstrings in one place, callers and tests keep one object, and a
concern can be read (and tested) on its own.
"""

from __future__ import annotations

from nocturne_operator.storage.audit import AuditTrail
from nocturne_operator.storage.budgets import NamespaceBudgets
from nocturne_operator.storage.checkpoints import Checkpoints
from nocturne_operator.storage.pages import RunPages
from nocturne_operator.storage.queries import RunReads
from nocturne_operator.storage.retention import Retention
from nocturne_operator.storage.runs import RunWrites
from nocturne_operator.storage.state import AgentStates

__all__ = ["History"]


class History(
    RunWrites,
    RunReads,
    RunPages,
    AuditTrail,
    AgentStates,
    Checkpoints,
    Retention,
    NamespaceBudgets,
):
    """The history repository: short transactions on a small pooled engine
    (``History.connect(url)``, or ``History(engine)``); see each base for its methods."""
