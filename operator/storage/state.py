"""Agent state (``agent_state``): what a schedule's agent saved for its next run, per optional
``task.stateKey``, with the output of the run that saved it. Sizes are bounded by the runner
contract (STATE_LIMIT_BYTES / STATE_OUTPUT_LIMIT_BYTES)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import validate_state
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.schema import AGENT_STATE

__all__ = ["AgentStates", "SavedState", "StateToSave"]


@dataclass(frozen=True)
class SavedState:
    """An agent's saved state with the output of the run that saved it."""

    state: Any
    output: str | None
    execution_id: int | None
    updated_at: datetime


@dataclass(frozen=True)
class StateToSave:
    """What a successful run hands to the next one: its state (and output), per schedule and
    optional ``task.stateKey``, for the incarnation ``schedule_uid``."""

    namespace: str
    schedule_name: str
    state_key: str
    schedule_uid: str | None
    state: Any
    output: str | None

    @property
    def what(self) -> str:
        return f"agent state of {self.namespace}/{self.schedule_name} (stateKey {self.state_key!r})"

    def validate(self) -> None:
        """StateTooLargeError over STATE_LIMIT_BYTES / STATE_OUTPUT_LIMIT_BYTES."""
        validate_state(self.state, self.output, what=self.what)


def save_state_in(conn: sa.Connection, saving: StateToSave, execution_id: int | None) -> None:
    """Replace the saved state within the caller's transaction (``finish`` records a success
    and its state together)."""
    insert = pg.insert(AGENT_STATE).values(
        namespace=saving.namespace,
        schedule_name=saving.schedule_name,
        state_key=saving.state_key,
        schedule_uid=saving.schedule_uid,
        state=saving.state,
        output=saving.output,
        execution_id=execution_id,
    )
    conn.execute(
        insert.on_conflict_do_update(
            constraint="pk_agent_state",
            set_={
                "state": insert.excluded.state,
                "output": insert.excluded.output,
                "execution_id": insert.excluded.execution_id,
                "schedule_uid": insert.excluded.schedule_uid,
                "updated_at": sa.func.now(),
            },
        )
    )


class AgentStates(Repository):
    """Saves and loads of ``agent_state``."""

    def save_state(
        self,
        namespace: str,
        schedule_name: str,
        state_key: str = "",
        *,
        state: Any,
        output: str | None,
        execution_id: int | None,
        schedule_uid: str | None = None,
    ) -> None:
        """Replace the agent state of a schedule (and state key) for its next run; with
        ``schedule_uid``, it is handed only to that incarnation of the name.

        Raises StateTooLargeError over STATE_LIMIT_BYTES / STATE_OUTPUT_LIMIT_BYTES.
        """
        saving = StateToSave(namespace, schedule_name, state_key, schedule_uid, state, output)
        saving.validate()
        with self._begin(f"save {saving.what}") as conn:
            save_state_in(conn, saving, execution_id)

    def load_state(
        self,
        namespace: str,
        schedule_name: str,
        state_key: str = "",
        *,
        schedule_uid: str | None = None,
    ) -> SavedState | None:
        """The state saved for a schedule (and state key), or None if none was saved. With
        ``schedule_uid``, state another incarnation of the name saved is not handed over."""
        t = AGENT_STATE
        query = sa.select(t.c.state, t.c.output, t.c.execution_id, t.c.updated_at).where(
            t.c.namespace == namespace,
            t.c.schedule_name == schedule_name,
            t.c.state_key == state_key,
        )
        if schedule_uid is not None:
            query = query.where(
                sa.or_(t.c.schedule_uid.is_(None), t.c.schedule_uid == schedule_uid)
            )
        what = f"load agent state of {namespace}/{schedule_name} (stateKey {state_key!r})"
        with self._begin(what) as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return SavedState(row.state, row.output, row.execution_id, row.updated_at)
