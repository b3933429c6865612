"""Passwords never reach a message: URL userinfo (an unescaped "@" too), ?password= and libpq
keyword DSNs (issue 12)."""

from __future__ import annotations

import pytest

from nocturne_operator.storage import redact_url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://db:5432/x?user=u&password=hunter2",
        "postgresql+psycopg://db/x?sslmode=require&password=hunter2&application_name=a",
        "host=db port=5432 user=u password=hunter2 dbname=x",
        "host=db password='hunter2 with spaces' dbname=x",
        "postgresql+psycopg://u:hunt@er2@db:5432/x",
        "postgresql+psycopg://u:hunter2@db:notaport/x?password=hunter2",
        "postgresql://u:hunter2@",
        "postgresql://u:hunter2@[::1:5432/x",
    ],
)
def test_redact_url_hides_every_password_form(url: str) -> None:
    redacted = redact_url(url)
    assert "hunter2" not in redacted
    assert "er2" not in redacted.replace("user", "")
    assert "***" in redacted


def test_redact_url_keeps_what_helps() -> None:
    assert redact_url("postgresql+psycopg://db:5432/x?user=u&password=hunter2") == (
        "postgresql+psycopg://db:5432/x?user=u&password=***"
    )
    assert redact_url("host=db user=u password=hunter2 dbname=x") == (
        "host=db user=u password=*** dbname=x"
    )
