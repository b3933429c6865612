"""The connection to PostgreSQL: the engine (URL checks, timeouts, a small pool), the errors every
storage operation raises and the base of the repository, whose methods each run in one short
transaction (``_begin``). Passwords never reach a message or a log: see ``redact_url``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

import sqlalchemy as sa

from agent_runner.contract import compact_json

__all__ = [
    "ExecutionNotFoundError",
    "HistoryError",
    "HistoryUnavailableError",
    "Repository",
    "create_engine",
    "redact_url",
    "translate_errors",
]

log = logging.getLogger(__name__)


class HistoryError(RuntimeError):
    """A history operation failed; the message names the operation and the cause."""


class HistoryUnavailableError(HistoryError):
    """The database could not be reached or did not answer in time (connection, timeout)."""


class ExecutionNotFoundError(HistoryError, LookupError):
    """No execution row has the given id."""


_URL_PASSWORD_RE = re.compile(r"(?P<head>://[^/@:\s]*:)[^@\s]*@")


def redact_url(url: str | sa.URL) -> str:
    """The URL with its password replaced by ``***``, safe to log (also for unparsable URLs)."""
    if isinstance(url, sa.URL):
        return url.render_as_string(hide_password=True)
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL still must not leak its password
        return _URL_PASSWORD_RE.sub(r"\g<head>***@", url)


def create_engine(
    url: str,
    *,
    connect_timeout: int,
    statement_timeout_ms: int | None,
    application_name: str,
    pool: bool,
    pool_size: int = 2,
) -> sa.Engine:
    """An engine on a ``postgresql(+psycopg)://`` URL with these timeouts (and, pooled,
    ``pool_size`` connections kept plus as many again on demand); raises HistoryError for any
    other URL (naming it without its password)."""
    try:
        parsed = sa.make_url(url)
    except Exception:  # the parser's message would repeat the password
        raise HistoryError(f"database URL {redact_url(url)} is not a valid URL") from None
    if parsed.get_backend_name() != "postgresql":
        raise HistoryError(
            f"database URL {redact_url(parsed)}: the history needs PostgreSQL "
            "(postgresql+psycopg://user:password@host:port/database)"
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if statement_timeout_ms is not None:
        # Appended to the server options (keeping e.g. a search_path the URL already sets).
        options = str(parsed.query.get("options", ""))
        options = f"{options} -c statement_timeout={int(statement_timeout_ms)}".strip()
        parsed = parsed.update_query_dict({"options": options})
    connect_args: dict[str, Any] = {"connect_timeout": connect_timeout}
    if "application_name" not in parsed.query:
        connect_args["application_name"] = application_name
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        poolclass=sa.QueuePool if pool else sa.NullPool,
        # Agent output and state are data, not diagnostics: keep them out of error messages.
        hide_parameters=True,
        json_serializer=compact_json,
        connect_args=connect_args,
        **({"pool_size": pool_size, "max_overflow": pool_size} if pool else {}),
    )


@contextmanager
def translate_errors(operation: str, url: sa.URL) -> Iterator[None]:
    """Re-raise driver errors as HistoryError naming the operation (never the password)."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip()
        raise HistoryUnavailableError(
            f"{operation}: database {redact_url(url)} unavailable: {cause}"
        ) from exc
    except sa.exc.DBAPIError as exc:
        cause = str(exc.orig or exc).strip()
        raise HistoryError(f"{operation} failed: {cause}") from exc


class Repository:
    """Short transactions on a small pooled engine: the base of each concern's methods."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        connect_timeout: int = 5,
        statement_timeout_ms: int = 15_000,
        application_name: str = "nocturne",
        pool_size: int = 2,
    ) -> Self:
        """A repository on ``url`` (``postgresql+psycopg://``); connects lazily, with pre-ping,
        ``connect_timeout`` seconds to connect, a server-side ``statement_timeout`` and
        ``pool_size`` pooled connections (the operator sizes it to its workers)."""
        if pool_size < 1:
            raise ValueError(f"pool_size: {pool_size} must be at least 1")
        engine = create_engine(
            url,
            connect_timeout=connect_timeout,
            statement_timeout_ms=statement_timeout_ms,
            application_name=application_name,
            pool=True,
            pool_size=pool_size,
        )
        log.debug("history database %s", redact_url(engine.url))
        return cls(engine)

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _begin(self, operation: str) -> Iterator[sa.Connection]:
        with translate_errors(operation, self.engine.url), self.engine.begin() as conn:
            yield conn
