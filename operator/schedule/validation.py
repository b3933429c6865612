"""Validation of an AgentSchedule beyond what the apiserver's schema and CEL rules can check:
cron semantics, minimum interval over a whole year, IANA time zone, budget caps, quota, and the
Secrets and model endpoints the cluster admin allows schedules to use.

Shared by the operator and the offline CLI (``nocturne validate``). Pure: no I/O; the caller
passes the clock and, for the quota, the namespace's schedules.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from nocturne_operator.api.model import DNS_SUBDOMAIN, AgentScheduleSpec
from nocturne_operator.api.money import plain
from nocturne_operator.prices import PriceTable, PriceTableError
from nocturne_operator.schedule import cron
from nocturne_operator.settings import Endpoint, Settings

MAX_NAME_LENGTH = 63
# The apiserver's rule for the names of custom resources (NameIsDNSSubdomain).
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN)
_DNS_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character"
)
# The task snapshot travels in every Job's environment (NOCTURNE_TASK): bounded well below the
# apiserver's 1.5 MiB object limit, so the rendered CronJob always fits (escaping included).
MAX_TASK_BYTES = 256 * 1024
# Zone names that load on the node but that the CronJob controller refuses ("Local" and the
# node's own zone) or that Go's embedded tzdata lacks (the tzdata build's extra links and trees).
_NOT_IANA_NAMES = frozenset({"Local", "localtime", "posixrules"})
_NOT_IANA_TREES = ("posix/", "right/")
# pydantic's type errors, in the words of the apiserver's structural schema.
_SCHEMA_TYPES = {
    "int_type": "integer",
    "int_from_float": "integer",
    "int_parsing": "integer",
    "bool_type": "boolean",
    "bool_parsing": "boolean",
    "string_type": "string",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "list_type": "array",
}


@dataclass(frozen=True)
class FieldError:
    """One broken rule: the field's path, the offending value and the rule, for people."""

    field: str
    value: Any
    rule: str
    has_value: bool = True

    def __str__(self) -> str:
        if not self.has_value:
            return f"{self.field}: {self.rule}"
        return f"{self.field} {_show(self.value)}: {self.rule}"


@dataclass(frozen=True)
class Validated:
    """Outcome of validation: the parsed spec when there are no errors, plus warnings."""

    spec: AgentScheduleSpec | None
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    min_interval: timedelta | None = None

    @property
    def ok(self) -> bool:
        """True when the schedule may run."""
        return self.spec is not None and not self.errors


@dataclass(frozen=True)
class Allowed:
    """A list of names one source allows (the cluster's settings, or a policy)."""

    entries: tuple[str, ...]
    source: str = ""
    """' (AgentSchedulePolicy "x")' when a policy set it, else "" (the cluster's settings)."""


@dataclass(frozen=True)
class NamespaceCap:
    """A monthly USD cap on a whole namespace, from the policy named ``policy``."""

    max_monthly_usd: Decimal
    time_zone: str
    policy: str


@dataclass(frozen=True)
class Limits:
    """The limits a namespace's schedules are validated against: the cluster's settings, or
    what the AgentSchedulePolicies selecting the namespace make of them (``schedule.policy``).
    Each ``*_by`` is appended to the rule a limit breaks: who decided it. A value must pass
    every ``Allowed`` of a tuple (policies of equal priority each have their say)."""

    min_interval_minutes: int
    max_per_run_usd: Decimal
    max_schedules: int
    llm_secrets: tuple[Allowed, ...]
    llm_base_urls: tuple[Allowed, ...]
    webhook_secrets: tuple[Allowed, ...]
    providers: tuple[Allowed, ...] = ()
    models: tuple[Allowed, ...] = ()
    namespace_budget: NamespaceCap | None = None
    min_interval_by: str = ""
    max_per_run_by: str = ""
    max_schedules_by: str = ""
    # The policy that set the per-run cap ("": the cluster's settings).
    max_per_run_policy: str = ""
    # A policy selecting the namespace is broken: its schedules are held until it is fixed (the
    # rules, and the policies' names).
    broken: tuple[str, ...] = ()
    broken_policies: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The cluster's own limits (no policy selects the namespace)."""
        return cls(
            min_interval_minutes=settings.min_interval_minutes,
            max_per_run_usd=settings.max_per_run_usd,
            max_schedules=settings.max_schedules_per_namespace,
            llm_secrets=(Allowed(tuple(settings.llm_secrets)),),
            llm_base_urls=(Allowed(tuple(settings.llm_base_urls)),),
            webhook_secrets=(Allowed(tuple(settings.webhook_secrets)),),
        )


@dataclass(frozen=True)
class Peer:
    """Another AgentSchedule in the same namespace, for the quota (oldest first wins)."""

    name: str
    created: str  # RFC 3339 creationTimestamp; sorts chronologically


def validate(
    body: Mapping[str, Any],
    settings: Settings,
    *,
    now: datetime,
    peers: Sequence[Peer] | None = None,
    prices: PriceTable | None = None,
    limits: Limits | None = None,
) -> Validated:
    """Validate an AgentSchedule object (``metadata`` + ``spec``) against ``settings``.

    ``peers`` are the namespace's AgentSchedules (including this one) for the quota; None skips
    the quota check (offline CLI without a cluster). ``prices`` is the cluster's price table
    (``load_price_table(settings.price_table_file)``); None skips the model's price check.
    ``limits``: the namespace's, as its AgentSchedulePolicies make them (None: the cluster's
    settings alone)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    limits = limits or Limits.of(settings)
    errors: list[FieldError] = [
        FieldError("metadata.namespace", None, rule, has_value=False) for rule in limits.broken
    ]
    name = _name(body.get("metadata"), errors)
    raw_spec = body.get("spec")
    if not isinstance(raw_spec, Mapping):
        errors.append(FieldError("spec", raw_spec, "required, must be a mapping"))
        return Validated(None, errors)
    try:
        spec = AgentScheduleSpec.model_validate(dict(raw_spec))
    except ValidationError as exc:
        errors.extend(_from_pydantic(exc, raw_spec))
        return Validated(None, errors)

    timing = _timing(spec.schedule, spec.time_zone, limits.min_interval_minutes, _hour_of(now))
    errors.extend(_decided(timing.errors, "spec.schedule", limits.min_interval_by))
    warnings = list(timing.warnings)
    if spec.budget.max_per_run_usd > limits.max_per_run_usd:
        cap = plain(limits.max_per_run_usd)
        where = "the namespace's" if limits.max_per_run_by else "the cluster-wide"
        errors.append(
            FieldError(
                "spec.budget.maxPerRunUSD",
                str(spec.budget.max_per_run_usd),
                f"exceeds {where} cap of {cap} USD per run{limits.max_per_run_by}",
            )
        )
    errors.extend(_task_size(spec))
    errors.extend(_models(spec, limits))
    if prices is not None:
        errors.extend(_priced(spec, prices))
    errors.extend(_credentials(spec, limits))
    if peers is not None:
        errors.extend(_quota(name, peers, limits.max_schedules, limits.max_schedules_by))
    if errors:
        return Validated(None, errors, warnings)
    return Validated(spec, [], warnings, timing.gap)


@dataclass(frozen=True)
class _Timing:
    """When a schedule runs, judged: its shortest gap (None when refused), errors, DST notes."""

    gap: timedelta | None
    errors: tuple[FieldError, ...]
    warnings: tuple[str, ...]


def _hour_of(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# The operator validates every schedule on every pass of its sweep (each minute). A year's scan
# of fire times and DST changes depends only on the schedule, the zone, the minimum and the
# clock, so it is computed once per hour: a DST note may be up to an hour late.
@functools.lru_cache(maxsize=4096)
def _timing(expr: str, zone_name: str, minimum_minutes: int, hour: datetime) -> _Timing:
    errors: list[FieldError] = []
    warnings: list[str] = []
    gap: timedelta | None = None
    tz = _zone(zone_name, errors)
    schedule = _schedule(expr, errors)
    if schedule is not None and _non_positive_every(expr):
        errors.append(
            FieldError(
                "spec.schedule",
                expr,
                "the @every duration must be positive (the CronJob controller would fire a zero "
                "or negative duration every second)",
            )
        )
        schedule = None
    if tz is not None and schedule is not None:
        try:
            minimum = timedelta(minutes=minimum_minutes)
            gap = _interval(schedule, tz, minimum, now=hour, errors=errors)
            for anomaly in cron.dst_anomalies(schedule, tz, hour):
                if anomaly.kind != "stalled":
                    warnings.append(str(anomaly))
                    continue
                # The CronJob controller stops firing for good: that is an error, not a note.
                errors.append(
                    FieldError(
                        "spec.schedule",
                        expr,
                        f"in {zone_name} the CronJob controller would stop firing on "
                        f"{anomaly.local_date} at {anomaly.local_time:%H:%M} ({anomaly.reason})",
                    )
                )
        except cron.CronError as exc:
            errors.append(FieldError("spec.schedule", expr, str(exc)))
    return _Timing(gap, tuple(errors), tuple(warnings))


def _interval(
    schedule: cron.CronSchedule,
    tz: ZoneInfo,
    minimum: timedelta,
    *,
    now: datetime,
    errors: list[FieldError],
) -> timedelta | None:
    """The shortest gap over this year in ``tz``; an error when below the cluster minimum."""
    year_start = datetime(now.astimezone(tz).year, 1, 1, tzinfo=tz)
    gap = cron.min_interval(schedule, tz, year_start)
    if gap >= minimum:  # the common case: one pass over the year
        return gap
    # Name the first offending gap, as people meet it in time order.
    too_short = cron.check_min_interval(schedule, tz, minimum, year_start) or gap
    errors.append(
        FieldError(
            "spec.schedule",
            schedule.expression,
            f"runs as often as every {_duration(too_short)} (in {tz.key}), "
            f"minimum interval is {_duration(minimum)}",
        )
    )
    return None


def _name(metadata: object, errors: list[FieldError]) -> str:
    """The schedule's name, with the apiserver's rules for it appended to ``errors``."""
    if not isinstance(metadata, Mapping):
        errors.append(FieldError("metadata", metadata, "must be a mapping"))
        return ""
    if "name" not in metadata or metadata["name"] in (None, ""):
        errors.append(FieldError("metadata.name", None, "required", has_value=False))
        return ""
    name = metadata["name"]
    if not isinstance(name, str):
        errors.append(FieldError("metadata.name", name, "must be of type string"))
        return ""
    if len(name) > MAX_NAME_LENGTH:
        errors.append(FieldError("metadata.name", name, f"at most {MAX_NAME_LENGTH} characters"))
    elif not _DNS_SUBDOMAIN.fullmatch(name):
        errors.append(FieldError("metadata.name", name, _DNS_SUBDOMAIN_RULE))
    return name


def _non_positive_every(expr: str) -> bool:
    """True for ``@every`` with a zero or negative duration, which robfig/cron (and so the
    CronJob controller) turns into one second: no one means that."""
    text = expr.strip()
    if not text.startswith("@every"):
        return False
    duration = text.removeprefix("@every").strip()
    numbers = re.findall(r"[0-9.]+", duration)
    return duration.startswith("-") or all(set(n) <= {"0", "."} for n in numbers)


def _task_size(spec: AgentScheduleSpec) -> list[FieldError]:
    task = spec.task.model_dump(mode="json", by_alias=True, exclude_none=True)
    size = len(json.dumps(task, ensure_ascii=False, separators=(",", ":")).encode())
    if size <= MAX_TASK_BYTES:
        return []
    # The query is bounded by the schema; what outgrows the bound is the free-form context.
    return [
        FieldError(
            "spec.task.context",
            None,
            f"the task is {size} bytes as JSON, at most {MAX_TASK_BYTES} bytes (it is copied "
            "into every run's Job)",
            has_value=False,
        )
    ]


def _priced(spec: AgentScheduleSpec, prices: PriceTable) -> list[FieldError]:
    """A model the price table lacks fails every run with a configuration error: refuse it."""
    provider = spec.agent.provider.value
    try:
        prices.lookup(provider, spec.agent.model)
    except PriceTableError:
        return [
            FieldError(
                "spec.agent.model",
                spec.agent.model,
                f'no price for provider "{provider}" in the cluster\'s price table',
            )
        ]
    return []


def _decided(errors: Sequence[FieldError], field: str, by: str) -> list[FieldError]:
    """``errors`` with ``by`` (the policy that set the limit) appended to the rule of those
    about ``field`` that a limit decides (the minimum interval)."""
    if not by:
        return list(errors)
    return [
        FieldError(e.field, e.value, f"{e.rule}{by}", e.has_value)
        if e.field == field and "minimum interval is" in e.rule
        else e
        for e in errors
    ]


def _refused(
    field: str,
    value: str,
    lists: Sequence[Allowed],
    rule: str,
    allows: Callable[[tuple[str, ...]], bool],
) -> list[FieldError]:
    """The error of ``value`` when one of ``lists`` (each source's) does not allow it."""
    for allowed in lists:
        if not allows(allowed.entries):
            return [
                FieldError(
                    field, value, f"{rule} (allowed: {_listed(allowed.entries)}){allowed.source}"
                )
            ]
    return []


def _models(spec: AgentScheduleSpec, limits: Limits) -> list[FieldError]:
    """The providers and models the namespace's policies allow (the price table otherwise)."""
    provider, model = spec.agent.provider.value, spec.agent.model
    return [
        *_refused(
            "spec.agent.provider",
            provider,
            limits.providers,
            "not a provider this namespace may use",
            lambda entries: provider in entries,
        ),
        *_refused(
            "spec.agent.model",
            model,
            limits.models,
            "not a model this namespace may use",
            lambda entries: any(fnmatch.fnmatchcase(model, entry) for entry in entries),
        ),
    ]


def _credentials(spec: AgentScheduleSpec, limits: Limits) -> list[FieldError]:
    """Secrets and endpoints are the cluster admin's choice: an API key goes out as
    ``Authorization`` to ``baseURL``, and the operator reads the webhook Secret with its own
    rights, so a schedule names only Secrets and endpoints the settings (or the namespace's
    policy) list."""
    errors: list[FieldError] = []
    key = spec.agent.api_key_secret_ref
    if key is not None:
        errors += _refused(
            "spec.agent.apiKeySecretRef.name",
            key.name,
            limits.llm_secrets,
            "not a Secret the cluster admin allows for LLM keys",
            lambda entries: key.name in entries,
        )
    if spec.agent.base_url:
        for allowed in limits.llm_base_urls:
            rule = _endpoint_rule(spec.agent.base_url, allowed.entries)
            if rule is not None:
                errors.append(
                    FieldError("spec.agent.baseURL", spec.agent.base_url, rule + allowed.source)
                )
                break
    hook = spec.notifications.webhook_secret_ref
    if hook is not None:
        errors += _refused(
            "spec.notifications.webhookSecretRef.name",
            hook.name,
            limits.webhook_secrets,
            "not a Secret the cluster admin allows for webhooks",
            lambda entries: hook.name in entries,
        )
    return errors


def _endpoint_rule(url: str, allowed: Sequence[str]) -> str | None:
    """The rule ``url`` breaks as a model endpoint, or None when an allowed endpoint covers it."""
    try:
        endpoint = Endpoint.parse(url)
    except ValueError as exc:
        return str(exc)
    if any(Endpoint.parse(entry).covers(endpoint) for entry in allowed):
        return None
    if not allowed:
        return "no endpoints are allowed but the provider's own (leave baseURL empty)"
    return f"not in the allowed endpoints ({_listed(allowed)})"


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def iana_zone(name: str) -> ZoneInfo | None:
    """The zone named ``name`` when the CronJob controller accepts it, else None: never raises
    (a tzdata directory such as "America" raises IsADirectoryError in ZoneInfo)."""
    if name in _NOT_IANA_NAMES or name.startswith(_NOT_IANA_TREES):
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, UnicodeError):
        return None


def _zone(name: str, errors: list[FieldError]) -> ZoneInfo | None:
    zone = iana_zone(name)
    if zone is None:
        errors.append(
            FieldError("spec.timeZone", name, "not an IANA time zone name (e.g. Asia/Tokyo)")
        )
    return zone


def _schedule(expr: str, errors: list[FieldError]) -> cron.CronSchedule | None:
    try:
        return cron.parse_schedule(expr)
    except cron.CronError as exc:
        errors.append(FieldError("spec.schedule", expr, str(exc)))
        return None


def _quota(name: str, peers: Sequence[Peer], limit: int, by: str = "") -> list[FieldError]:
    ordered = sorted(peers, key=lambda p: (p.created, p.name))
    allowed = {p.name for p in ordered[:limit]}
    if name in allowed or len(ordered) <= limit:
        return []
    return [
        FieldError(
            "metadata.namespace",
            name,
            f"quota exceeded: at most {limit} AgentSchedules per namespace "
            f"({len(ordered)} exist; the oldest {limit} run){by}",
            has_value=True,
        )
    ]


def _from_pydantic(exc: ValidationError, raw_spec: Mapping[str, Any]) -> list[FieldError]:
    errors = []
    for err in exc.errors():
        # pydantic reports locations by alias, i.e. the CR's camelCase names.
        path = "spec" + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
        )
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] in _SCHEMA_TYPES:
            # The apiserver converts nothing: "600" is no integer, true no count.
            kind = _SCHEMA_TYPES[err["type"]]
            errors.append(FieldError(path, err.get("input"), f"must be of type {kind}"))
        elif err["type"] == "missing":
            errors.append(FieldError(path, None, "required", has_value=False))
        elif err["type"] == "extra_forbidden":
            errors.append(FieldError(path, None, "unknown field", has_value=False))
        elif err["type"] == "invalid_key" and isinstance(err["input"], bool):
            # YAML 1.1 (kubectl, Helm, PyYAML) reads unquoted on/off/yes/no keys as booleans.
            parent = path.rsplit("[", 1)[0]
            errors.append(
                FieldError(
                    parent,
                    None,
                    f"a key was read as {str(err['input']).lower()}: YAML 1.1 turns an unquoted "
                    "on/off/yes/no key into a boolean; quote it (notifications use 'events', "
                    "not 'on')",
                    has_value=False,
                )
            )
        elif err["loc"] and err["type"] == "value_error" and isinstance(err["input"], Mapping):
            # A cross-field rule of a nested object: name the object, not its whole value.
            errors.append(FieldError(path, None, message, has_value=False))
        else:
            errors.append(FieldError(path, err.get("input"), message))
    return errors


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):  # keys JSON cannot hold, which YAML makes: dates, bytes
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 60:
        return f"{seconds} s"
    if seconds >= 3 * 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"
