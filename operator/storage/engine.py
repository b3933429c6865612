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


# A password can hide in three places: the URL's userinfo (user:password@, where an unescaped
# "@" in the password moves the host's start to the last "@"), a query parameter (?password=),
# and a libpq keyword DSN (host=db password=...). Each is replaced by ***.
_SECRET_KEYS = r"(?:ssl)?password"  # noqa: S105 (the keys' names, not a password)
_QUERY_SECRET_RE = re.compile(rf"(?i)([?&]{_SECRET_KEYS}=)[^&#]*")
_KEYWORD_SECRET_RE = re.compile(rf"(?i)(\b{_SECRET_KEYS}\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S*)")


def redact_url(url: str | sa.URL) -> str:
    """The URL (or libpq keyword DSN) with every password replaced by ``***``, safe to log,
    also for URLs the parser misreads or refuses."""
    text = url.render_as_string(hide_password=True) if isinstance(url, sa.URL) else str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:  # a keyword DSN: host=db user=u password=secret dbname=x
        return _KEYWORD_SECRET_RE.sub(r"\g<1>***", text)
    return scheme + sep + _QUERY_SECRET_RE.sub(r"\g<1>***", _redact_userinfo(rest))


def _redact_userinfo(rest: str) -> str:
    """``rest`` (the URL after ``://``) with the password of its userinfo replaced. The userinfo
    ends at the last "@" before the path that follows the first "@": a password may hold an
    unescaped "@" or "/", so anything up to there may be password."""
    first = rest.find("@")
    if first < 0:
        return rest
    path = rest.find("/", first)
    end = rest.rfind("@", 0, path if path >= 0 else len(rest))
    userinfo, host = rest[:end], rest[end + 1 :]
    user, colon, _password = userinfo.partition(":")
    return f"{user}:***@{host}" if colon else rest


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
