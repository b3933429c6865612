"""Fuzzing the real run API (issue 12): random and near-valid start, progress and finish bodies
over TLS, with a valid token for a granted run, against real PostgreSQL. Every refusal is a 4xx
``ApiError`` (never a 500, a hang or a stack trace) and changes no row; what the contract
accepts is answered 200 or with a 4xx that says why.

Deterministic: the property runs under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, example, given, settings
from pydantic import ValidationError

from agent_runner.contract import FINISH_PATH, PROGRESS_PATH, START_PATH, Ack, Grant
from integration.test_runapi import RunningApi, granted, ref, run_identity
from nocturne_operator.storage import History
from unit.test_fuzz_runapi_bodies import MODELS, RUN, assert_api_error, bodies, encoded, valid_body

pytestmark = pytest.mark.integration

# Each example is one HTTPS request and two table reads. All examples of the test share its
# server and granted run on purpose (the run a hostile pod would hammer): hence the function-scoped
# fixtures under @given.
PROFILE = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
TABLES = ("schedule_executions", "agent_state", "schedule_events")


@pytest.fixture
def api(history: History) -> Iterator[RunningApi]:
    running = RunningApi(history)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def database(url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def rows(database: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the history tables, in a stable order."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    with database.connect() as conn:
        for table in TABLES:
            query = sa.text(f"SELECT * FROM {table} ORDER BY 1")  # noqa: S608 - constant names
            found[table] = [tuple(row) for row in conn.execute(query)]
    return found


# The bodies name this execution id; each request carries the granted run's id in its place.
OWN = 4_242_424_242


@PROFILE
@given(path_and_body=bodies(RUN, OWN))
# Found by this property: an execution id beyond BIGINT was a 500 (a database error), and so was
# finish metadata holding a NUL, which JSONB cannot store.
@example(path_and_body=(PROGRESS_PATH, encoded(valid_body(PROGRESS_PATH, RUN, 2**63), True)))
@example(
    path_and_body=(
        FINISH_PATH,
        encoded(valid_body(FINISH_PATH, RUN, OWN) | {"metadata": {"a": "\x00"}}, True),
    )
)
def test_property_hostile_bodies_are_answered_4xx_and_change_nothing(
    api: RunningApi, database: sa.Engine, path_and_body: tuple[str, bytes]
) -> None:
    identity = run_identity("daily-1")
    assert ref(identity) == RUN
    token, grant = granted(api, identity)  # a replayed start: the same grant every example
    path, body = path_and_body
    body = body.replace(str(OWN).encode(), str(grant.execution_id).encode())
    before = rows(database)
    response = api.post(path, token, body)
    event(f"{path} {response.status_code}")  # shown by --hypothesis-show-statistics
    model = MODELS[path]
    try:
        model.model_validate_json(body)
    except ValidationError:
        error = assert_api_error(response.text, response.status_code)
        assert (response.status_code, error.reason) == (400, "BadRequest"), error
        assert rows(database) == before
        return
    if response.status_code == 200:
        (Grant if path == START_PATH else Ack).model_validate_json(response.content)
        return
    error = assert_api_error(response.text, response.status_code)
    if error.reason != "StateTooLarge":  # the run is recorded, only its state is refused
        assert rows(database) == before, error
