"""What a list or watch of agentruns asks for: label and field selectors into a ``RunFilter``,
and the ``continue`` token of a page.

Label selectors have Kubernetes' grammar (``a=b``, ``a==b``, ``a!=b``, ``a in (b,c)``,
``a notin (b,c)``, ``a``, ``!a``) over the labels every AgentRun has (``nocturne.dev/schedule``,
``nocturne.dev/job``, ``nocturne.dev/result``); a requirement on any other label is decided as
Kubernetes would for objects without it (``=``, ``in`` and existence match nothing; ``!=``,
``notin`` and ``!`` match everything). Field selectors take ``=``, ``==`` and ``!=`` on
``metadata.name``, ``metadata.namespace``, ``spec.schedule``, ``spec.job`` and ``status.result``,
and ``=`` on ``status.startedAfter`` / ``status.startedBefore`` (RFC 3339; runs started at or
after, and before) -- a time range, which Kubernetes' own field selectors have no operator for.
Anything else is a 400 naming the selector, the requirement and the rule.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from agent_runner.contract import RunOutcome
from nocturne_operator.api.timestamps import parse_rfc3339
from nocturne_operator.runsapi.resources import (
    LABEL_JOB,
    LABEL_RESULT,
    LABEL_SCHEDULE,
    parse_name,
    result_of,
)
from nocturne_operator.storage import RunFilter

__all__ = ["Selection", "SelectorError", "decode_continue", "encode_continue", "select"]

_SELECTOR_CHARS = 4096
_SET = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(notin|in)\s*\(([^()]*)\))?\s*$")
_EQUALITY = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._:+-]*)\s*$")


class SelectorError(ValueError):
    """A selector or continue token the API cannot read: a 400 with this message."""


@dataclass(frozen=True)
class Selection:
    """A RunFilter and whether the selectors can match anything at all."""

    filter: RunFilter = field(default_factory=RunFilter)
    empty: bool = False


def _split(selector: str) -> list[str]:
    """Requirements separated by commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


_KEYS = {
    LABEL_SCHEDULE: "schedule",
    LABEL_JOB: "job",
    LABEL_RESULT: "result",
    "spec.schedule": "schedule",
    "spec.job": "job",
    "status.result": "result",
}


class _Builder:
    """Requirements into one RunFilter: an equality narrows, several contradict (empty)."""

    def __init__(self, namespace: str | None) -> None:
        self.selection = Selection(RunFilter(namespace=namespace))

    def _set(self, **changes: Any) -> None:
        self.selection = replace(self.selection, filter=replace(self.selection.filter, **changes))

    def nothing(self) -> None:
        self.selection = replace(self.selection, empty=True)

    def equal(self, what: str, values: list[str], where: str) -> None:
        current = self.selection.filter
        if what == "result":
            outcomes = {o for v in values if (o := _outcome(v, where)) is not None}
            if current.statuses is not None:
                outcomes &= set(current.statuses)
            self._set(statuses=frozenset(outcomes))
            if not outcomes:
                self.nothing()
            return
        wanted = set(values)
        old = getattr(current, what)
        if old is not None:
            wanted &= {old}
        if len(wanted) != 1:
            # "in (a,b)" on schedule or job: not one value; taken as "nothing" only if empty.
            if not wanted:
                self.nothing()
                return
            if len(wanted) > 1:
                raise SelectorError(
                    f"{where}: at most one value for {what} (an 'in' set of schedules or Jobs "
                    "is not supported; list them one at a time)"
                )
        self._set(**{what: wanted.pop()})

    def not_equal(self, what: str, values: list[str], where: str) -> None:
        current = self.selection.filter
        if what == "result":
            outcomes = {o for v in values if (o := _outcome(v, where)) is not None}
            self._set(not_statuses=frozenset({*current.not_statuses, *outcomes}))
        elif what == "schedule":
            self._set(not_schedules=frozenset({*current.not_schedules, *values}))
        else:
            self._set(not_jobs=frozenset({*current.not_jobs, *values}))


def _outcome(value: str, where: str) -> RunOutcome | None:
    outcome = result_of(value)
    if outcome is None:
        known = ", ".join(o.display for o in RunOutcome)
        raise SelectorError(f"{where}: {value!r} is not a result (one of {known})")
    return outcome


def _time(value: str, where: str) -> datetime:
    try:
        moment = parse_rfc3339(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SelectorError(
            f"{where}: {value!r} is not an RFC 3339 time with a zone (e.g. 2026-11-01T00:00:00Z)"
        )
    return moment


def select(namespace: str | None, label_selector: str, field_selector: str) -> Selection:
    """The runs a list or watch in ``namespace`` (None: all) selects; SelectorError says why a
    selector cannot be read."""
    builder = _Builder(namespace)
    for name, text in (("labelSelector", label_selector), ("fieldSelector", field_selector)):
        if len(text) > _SELECTOR_CHARS:
            raise SelectorError(f"{name}: longer than {_SELECTOR_CHARS} characters")
    for requirement in _split(label_selector):
        _label(builder, requirement, f"labelSelector {requirement!r}")
    for requirement in _split(field_selector):
        _field(builder, requirement, namespace, f"fieldSelector {requirement!r}")
    return builder.selection


def _label(builder: _Builder, requirement: str, where: str) -> None:
    equality = _EQUALITY.match(requirement)
    if equality is not None:
        key, op, value = equality.groups()
        values, negate = [value], op == "!="
    else:
        found = _SET.match(requirement)
        if found is None:
            raise SelectorError(
                f"{where}: not a label requirement (key=value, key!=value, "
                "key in (a,b), key notin (a,b), key, !key)"
            )
        bang, key, op, listed = found.groups()
        if op is None:  # existence: every AgentRun has its three labels
            if (key in _KEYS and key.startswith("nocturne.dev/")) == bool(bang):
                builder.nothing()
            return
        values = [v.strip() for v in listed.split(",") if v.strip()]
        negate = op == "notin"
        if bang:
            raise SelectorError(f"{where}: '!' goes only before a bare key")
    what = _KEYS.get(key) if key.startswith("nocturne.dev/") else None
    if what is None:  # a label no AgentRun has
        if not negate:
            builder.nothing()
        return
    if negate:
        builder.not_equal(what, values, where)
    else:
        builder.equal(what, values, where)


def _field(builder: _Builder, requirement: str, namespace: str | None, where: str) -> None:
    equality = _EQUALITY.match(requirement)
    if equality is None:
        raise SelectorError(f"{where}: not a field requirement (field=value or field!=value)")
    key, op, value = equality.groups()
    negate = op == "!="
    special = _SPECIAL_FIELDS.get(key)
    if special is not None:
        if negate:
            raise SelectorError(f"{where}: {key} takes '=' only")
        special(builder, value, namespace, where)
        return
    what = _KEYS.get(key) if not key.startswith("nocturne.dev/") else None
    if what is None:
        fields = ", ".join(sorted([*_SPECIAL_FIELDS, "spec.schedule", "spec.job", "status.result"]))
        raise SelectorError(f'{where}: field label not supported: "{key}" (fields: {fields})')
    if negate:
        builder.not_equal(what, [value], where)
    else:
        builder.equal(what, [value], where)


def _namespace_field(builder: _Builder, value: str, namespace: str | None, _where: str) -> None:
    current = builder.selection.filter.namespace
    if current is not None and value != current:
        builder.nothing()  # another namespace than the path's, or than an earlier requirement's
    else:
        builder._set(namespace=value)
    del namespace


def _name_field(builder: _Builder, value: str, _namespace: str | None, where: str) -> None:
    parsed = parse_name(value)
    if parsed is None:
        builder.nothing()
        return
    schedule, run_id = parsed
    builder.equal("schedule", [schedule], where)
    current = builder.selection.filter.run_id
    if current is not None and current != run_id:
        builder.nothing()
    else:
        builder._set(run_id=run_id)


def _started_after(builder: _Builder, value: str, _namespace: str | None, where: str) -> None:
    moment, current = _time(value, where), builder.selection.filter.started_after
    builder._set(started_after=moment if current is None else max(current, moment))


def _started_before(builder: _Builder, value: str, _namespace: str | None, where: str) -> None:
    moment, current = _time(value, where), builder.selection.filter.started_before
    builder._set(started_before=moment if current is None else min(current, moment))


_SPECIAL_FIELDS = {
    "metadata.namespace": _namespace_field,
    "metadata.name": _name_field,
    "status.startedAfter": _started_after,
    "status.startedBefore": _started_before,
}


def encode_continue(started_at: datetime, run_id: int) -> str:
    """The token of the page after the run (started_at, id)."""
    data = json.dumps({"s": started_at.isoformat(), "i": run_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[datetime, int]:
    """(started_at, id) of a continue token; SelectorError when it is not one of ours."""
    problem = SelectorError("continue: not a continue token of this API (start the list again)")
    if len(token) > 256:
        raise problem
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        started, run_id = parse_rfc3339(str(data["s"])), data["i"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise problem from None
    if (
        started.tzinfo is None
        or not isinstance(run_id, int)
        or isinstance(run_id, bool)
        or not 0 < run_id < 2**63
    ):
        raise problem
    return started, run_id
