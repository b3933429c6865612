"""NOCTURNE_WATCH_NAMESPACES -> kopf namespace patterns, checked with kopf's own matcher."""

from __future__ import annotations

import pytest
from kopf._cogs.structs.references import (  # the matcher kopf applies
    NamespaceName,
    match_namespace,
)

from nocturne_operator.__main__ import watch_patterns


def watched(value: str, namespace: str) -> bool:
    # kopf serves a namespace when any of the patterns matches it.
    return any(match_namespace(NamespaceName(namespace), p) for p in watch_patterns(value))


@pytest.mark.parametrize(
    ("value", "namespace", "expected"),
    [
        ("team-a,team-b", "team-a", True),
        ("team-a,team-b", "team-c", False),
        ("!chart-*", "chart-1", False),
        ("!chart-*", "default", True),
        # Two exclusions: each must hold; as two patterns each would admit the other's.
        ("!chart-*,!solo-*", "chart-1", False),
        ("!chart-*,!solo-*", "solo-1", False),
        ("!chart-*,!solo-*", "research", True),
        ("team-*, !team-tmp", "team-tmp", False),
        ("team-*, !team-tmp", "team-a", True),
    ],
)
def test_patterns(value: str, namespace: str, expected: bool) -> None:
    assert watched(value, namespace) is expected


def test_plain_lists_stay_separate_patterns() -> None:
    """The Helm chart's list of namespaces: kopf then watches exactly these (no cluster-wide
    namespace listing needed)."""
    assert watch_patterns("team-a, team-b,") == ["team-a", "team-b"]
    assert watch_patterns("") == []
