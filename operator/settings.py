"""Cluster-wide settings of the operator: limits that bound every schedule, and how runner pods
are rendered. Read from ``NOCTURNE_*`` environment variables and an optional YAML file
(``NOCTURNE_CONFIG_FILE``), which the Helm chart renders from its values."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from nocturne_operator.api.model import DNS_SUBDOMAIN
from nocturne_operator.errors import SettingsError


class Resources(BaseModel):
    """Requests and limits of runner pods (Kubernetes quantity strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_request: str = "100m"
    memory_request: str = "256Mi"
    cpu_limit: str = "1"
    memory_limit: str = "512Mi"


_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN)
_PATH_SEGMENT_TRAPS = frozenset({".", ".."})


def _secret_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            "not a Secret name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
            "at most 253 characters)"
        )
    return value


@dataclass(frozen=True)
class Endpoint:
    """An http(s) URL taken apart for allow-list matching: scheme and host lowercased, the
    default port filled in, the path as percent-decoded segments."""

    scheme: str
    host: str
    port: int
    path: tuple[str, ...]

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """The parts of ``url``; ValueError saying which rule it breaks: http(s) only, a host,
        no credentials, query or fragment, no ``.``/``..`` segments, no backslashes."""
        if any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in url):
            raise ValueError("must not contain spaces, control characters or backslashes")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http or https URL")
        if "@" in parts.netloc:
            raise ValueError("must not carry credentials (user:password@)")
        if parts.query or url.endswith("?"):
            raise ValueError("must not have a query (?...)")
        if parts.fragment or "#" in url:
            raise ValueError("must not have a fragment (#...)")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ValueError("has no host")
        if not host.isascii():
            raise ValueError("host must be ASCII (write an international name in its xn-- form)")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        elif port == 0:
            raise ValueError("has a port that is not a number from 1 to 65535")
        with contextlib.suppress(ValueError):
            host = ipaddress.ip_address(host).compressed  # one spelling per address
        segments = tuple(unquote(s) for s in parts.path.split("/") if s)
        if any(s in _PATH_SEGMENT_TRAPS or "/" in s or "\\" in s for s in segments):
            raise ValueError("must not have '.' or '..' path segments or encoded slashes")
        return cls(parts.scheme, host, port, segments)

    def covers(self, other: Endpoint) -> bool:
        """True when ``other`` lies under this endpoint: same scheme, host and port, and this
        path is a prefix of its path by whole segments (``/v1`` covers ``/v1/x``, not ``/v10``)."""
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port) and (
            other.path[: len(self.path)] == self.path
        )


def _endpoint_url(value: str) -> str:
    Endpoint.parse(value)
    return value


# The shortest retention of runs and audit rows: this month and the whole month before stay in
# any zone (the monthly budget and cost by month read them); 0 keeps rows forever.
MIN_RETENTION_DAYS = 62


def _retention_days(value: int) -> int:
    if 0 < value < MIN_RETENTION_DAYS:
        raise ValueError(
            f"below the minimum of {MIN_RETENTION_DAYS} days (the monthly budget sums this "
            "month's runs in each schedule's zone and cost by month reads the month before; "
            "0 keeps rows forever)"
        )
    return value


SecretName = Annotated[str, AfterValidator(_secret_name)]
EndpointURL = Annotated[str, AfterValidator(_endpoint_url)]
RetentionDays = Annotated[int, Field(ge=0, le=36_500), AfterValidator(_retention_days)]


class Settings(BaseSettings):
    """Every limit has a default an operator can run with; the chart overrides them."""

    model_config = SettingsConfigDict(
        env_prefix="NOCTURNE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    max_schedules_per_namespace: int = Field(50, ge=1, le=10_000)
    min_interval_minutes: int = Field(60, ge=1, le=525_600)
    max_per_run_usd: Decimal = Field(Decimal("10"), ge=0, max_digits=12, decimal_places=6)
    runner_image: str = Field("ghcr.io/nocturne-dev/nocturne-runner:0.1.0", min_length=1)
    runner_image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    runner_service_account: str = ""
    runner_resources: Resources = Resources()
    # The operator's own connection (from a Secret via env); it is PostgreSQL's only client.
    # None: no history, and runs get no budget grant (fail closed).
    database_url: SecretStr | None = None
    # Pooled connections kept (as many again on demand). None: one per kopf worker plus two
    # (the delivery loop, the reaper), so no worker waits for one and none is opened per call.
    database_pool_size: int | None = Field(None, ge=1, le=100)
    # The cluster's price table (the chart mounts its ConfigMap here). It lives only with the
    # operator: each run's grant carries its model's price. None: the built-in table.
    price_table_file: Path | None = None
    # --- the run API runner pods report through (issue 10) ---
    # Port of the TLS listener; served by every replica.
    run_api_port: int = Field(8443, ge=1, le=65535)
    run_api_bind: str = "0.0.0.0"  # noqa: S104 - runner pods connect from the pod network
    # The URL runner pods use (the chart's Service); its host is in the serving certificate.
    run_api_url: str = Field(
        "https://nocturne-run-api.nocturne-system.svc:8443", pattern=r"^https://[^\s/]+(/\S*)?$"
    )
    # More names (DNS or IP) for the serving certificate, besides run_api_url's host.
    run_api_hostnames: list[str] = Field(default_factory=list)
    # The operator's own CA and serving certificate live in this Secret of this namespace (the
    # operator's). Empty namespace: an in-memory CA for one process (development only).
    run_api_tls_secret: str = Field("nocturne-run-api-tls", min_length=1, max_length=253)
    run_api_tls_namespace: str = Field("", max_length=63)
    # --- the validating admission webhook (issue 15) ---
    # Port of its TLS listener; 0: no webhook (errors show on status only).
    webhook_port: int = Field(0, ge=0, le=65535)
    webhook_bind: str = "0.0.0.0"  # noqa: S104 - the kube-apiserver connects from outside
    # The host the apiserver calls (the chart's Service, <fullname>-webhook.<namespace>.svc);
    # it is in the operator's serving certificate. The URL's port is webhook_port.
    webhook_host: str = Field("localhost", min_length=1, max_length=253)
    # Ignore: a stopped operator blocks nobody (status is the second line). Fail: mandatory.
    webhook_failure_policy: Literal["Ignore", "Fail"] = "Ignore"
    # The ValidatingWebhookConfiguration kopf keeps pointed at this operator.
    webhook_configuration: str = Field("validate.nocturne.dev", min_length=1, max_length=253)
    # --- the agentruns API, served through API aggregation (issue 17) ---
    # Port of its TLS listener (the APIService's Service points here); 0: not served.
    runs_api_port: int = Field(8444, ge=0, le=65535)
    runs_api_bind: str = "0.0.0.0"  # noqa: S104 - the kube-apiserver connects from outside
    # The APIService whose caBundle the operator keeps set to its CA ("": leave it alone).
    runs_api_apiservice: str = Field("v1alpha1.runs.nocturne.dev", max_length=253)
    # Lifetime of the runner's projected token (the kubelet refreshes it at 80%).
    runner_token_expiration_seconds: int = Field(3600, ge=600, le=86_400)
    # Let runners' web_fetch reach private and loopback addresses (never link-local/metadata).
    web_fetch_allow_private: bool = False
    successful_jobs_history_limit: int = Field(3, ge=0, le=100)
    failed_jobs_history_limit: int = Field(3, ge=0, le=100)
    job_ttl_seconds_after_finished: int = Field(3 * 86_400, ge=60)
    # How often runner pods whose Job is gone and runs left RUNNING are looked for, and how
    # soon a schedule is looked at again when its pass found the database away.
    reconcile_interval_seconds: float = Field(60.0, ge=1, le=3600)
    # The longest a schedule goes without a pass when nothing happens to it (events, its next
    # slot, a silent-stop deadline and a new month each bring one on time): a safety net, the
    # way client-go's informers resync. Each schedule's is shortened by up to a tenth, spread.
    resync_interval_seconds: float = Field(3600.0, ge=1, le=86_400)
    next_runs_count: int = Field(5, ge=1, le=10)
    # /metrics for Prometheus; 0 turns it off.
    metrics_port: int = Field(9090, ge=0, le=65535)
    # Webhook notifications (spec.notifications); off: nothing is queued or sent, and the
    # operator needs no right to read Secrets.
    notifications_enabled: bool = True
    notification_max_attempts: int = Field(6, ge=1, le=50)
    notification_retry_base_seconds: float = Field(10.0, gt=0, le=3600)
    notification_retry_cap_seconds: float = Field(600.0, gt=0, le=86_400)
    notification_timeout_seconds: float = Field(10.0, gt=0, le=120)
    # A run the operator learns of later than this after it finished (it was down) is news
    # too old to send.
    notification_max_age_seconds: int = Field(6 * 3600, ge=60, le=7 * 86_400)
    # Sent, failed and suppressed notices are deleted from the outbox after this many days.
    notification_retention_days: int = Field(30, ge=1, le=3650)
    # --- retention of history (issue 14), purged by the sweep; 0 keeps rows forever ---
    # Finished runs (schedule_executions) started more than this many days ago are deleted,
    # their totals kept per schedule (schedule_purged_totals); a schedule's runs since its last
    # success stay.
    history_retention_days: RetentionDays = 400
    # Audit rows (schedule_events) older than this are deleted; a live schedule's `created` stays.
    audit_retention_days: RetentionDays = 400
    # Rows one purge transaction deletes at most (a Job's attempts go together).
    retention_batch_size: int = Field(500, ge=1, le=10_000)
    # --- credentials and endpoints schedules may use (issue 10) ---
    # Secrets (by name, in the schedule's own namespace) a schedule may name in
    # spec.agent.apiKeySecretRef; their values go to the model's endpoint. Empty: no schedule
    # may use a key (only provider offline runs).
    llm_secrets: list[SecretName] = Field(default_factory=lambda: ["llm-credentials"])
    # spec.agent.baseURL must lie under one of these (scheme, host and port equal, path a
    # prefix by whole segments); an empty baseURL (the provider's own endpoint) always may.
    # http only where an entry says http.
    llm_base_urls: list[EndpointURL] = Field(
        default_factory=lambda: ["https://api.openai.com/v1", "https://api.anthropic.com"]
    )
    # Secrets a schedule may name in spec.notifications.webhookSecretRef; the operator reads
    # no other Secret for a webhook URL.
    webhook_secrets: list[SecretName] = Field(default_factory=lambda: ["slack"])
    # Let webhooks go to loopback and private addresses, over http too (in-cluster receivers);
    # never to link-local or cloud metadata addresses. Off: public https receivers only.
    webhook_allow_private: bool = False
    # --- replicas (issue 15): the Lease (in run_api_tls_namespace) the leading replica holds;
    # it reconciles and sweeps. A standby takes a Lease not renewed for leader_lease_seconds;
    # the leader stops writing leader_renew_deadline_seconds after its last renewal.
    leader_lease_name: str = Field("nocturne-operator", min_length=1, max_length=253)
    leader_lease_seconds: float = Field(15.0, ge=2, le=300)
    leader_renew_deadline_seconds: float = Field(10.0, ge=1, le=300)
    leader_retry_seconds: float = Field(2.0, ge=0.2, le=60)
    # On SIGTERM the run API answers readiness 503 and goes on serving this long, so that the
    # Service stops sending reports here before the listener closes.
    shutdown_drain_seconds: float = Field(0.0, ge=0, le=120)

    @model_validator(mode="after")
    def _lease_timing_is_ordered(self) -> Settings:
        if not (
            self.leader_retry_seconds
            < self.leader_renew_deadline_seconds
            < self.leader_lease_seconds
        ):
            raise ValueError(
                f"leader_retry_seconds {self.leader_retry_seconds} < "
                f"leader_renew_deadline_seconds {self.leader_renew_deadline_seconds} < "
                f"leader_lease_seconds {self.leader_lease_seconds} does not hold"
            )
        return self

    @model_validator(mode="after")
    def _retry_cap_covers_the_base(self) -> Settings:
        if self.notification_retry_cap_seconds < self.notification_retry_base_seconds:
            raise ValueError(
                f"notification_retry_cap_seconds {self.notification_retry_cap_seconds} is below "
                f"notification_retry_base_seconds {self.notification_retry_base_seconds}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments win over the environment; no .env or secrets-dir lookups."""
        return init_settings, env_settings


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (or ``$NOCTURNE_CONFIG_FILE``), the environment and
    ``overrides``; raises SettingsError naming the file and field on bad values."""
    path = config_file or (
        Path(os.environ["NOCTURNE_CONFIG_FILE"]) if os.environ.get("NOCTURNE_CONFIG_FILE") else None
    )
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"{path}: cannot read settings: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: settings must be a mapping, got {type(loaded).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = str(path) if path else "settings"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])} {err.get('input')!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"{where}: {problems}") from exc
