"""One settings class for every role: all configuration is `MOTORCADE_*` environment variables.

Each field documents its default; `docs/configuration.md` is written from the same fields
(devtools/configdoc.py). The class validates itself: a production deployment that still carries
the dev key, or has no identity provider, refuses to start.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.defaults import (
    DEFAULT_INGEST_GROUP_MAX_ITEMS,
    DEFAULT_INGEST_GROUP_WAIT_MS,
    DEFAULT_INGEST_QUEUE_MAX_ITEMS,
    DEFAULT_INGEST_WRITERS,
    DEFAULT_MAX_CLOCK_SKEW_SECONDS,
    DEFAULT_MAX_SEQ_JUMP,
    DEFAULT_MIN_BATTERY_PERCENT,
    DEFAULT_OFFLINE_AFTER_SECONDS,
    DEFAULT_REQUIRE_STATIONARY,
    DEFAULT_ROLLOUT_START_GRACE_SECONDS,
    DEFAULT_TELEMETRY_BATTERY_STEP,
    DEFAULT_TELEMETRY_MAX_BODY_BYTES,
    DEFAULT_TELEMETRY_REFRESH_SECONDS,
)


class SettingsError(ValueError):
    """Raised for a configuration that must not run."""


def normalize_database_url(url: str) -> str:
    """Accept the usual `postgresql://` / `postgres://` forms and select the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("MOTORCADE_DATABASE_URL must be a postgresql:// URL")


def libpq_url(url: str) -> str:
    """The same URL as plain libpq understands it (for psycopg.connect, COPY, pg tools)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# What a secret left as the deployment files' placeholder contains (`.env.example`:
# `change-me-openssl-rand-hex-32`), in any case.
PLACEHOLDER_MARKS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "placeholder",
    "example",
    "secret",
)
MIN_SECRET_LENGTH = 32  # bytes
SECRET_MIN_BITS = 100  # estimated: length times the Shannon entropy of its characters
# (32 random hex characters, 128 real bits, estimate about 115)
SECRET_MIN_BITS_PER_CHAR = 3.0  # hex is 4; fewer than 8 distinct characters is below 3


def secret_weakness(value: str) -> str | None:
    """Why a shared secret is too weak for production (None: it will do): a placeholder,
    shorter than 32 bytes, a repeated pattern (`abab...`, `0123...0123...`), or too little
    entropy estimated from its own characters' frequencies (`aaaa...b`, fewer than 8 distinct
    characters). `openssl rand -hex 32` passes (0 of 20,000 refused)."""
    lowered = value.lower()
    mark = next((m for m in PLACEHOLDER_MARKS if m in lowered), None)
    if mark is not None:
        return f"is a placeholder (contains {mark!r}): generate one (openssl rand -hex 32)"
    if len(value.encode()) < MIN_SECRET_LENGTH:
        return f"must be at least {MIN_SECRET_LENGTH} bytes (openssl rand -hex 32)"
    counts = Counter(value)
    per_char = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    if (
        (value + value).find(value, 1) < len(value)
        or per_char < SECRET_MIN_BITS_PER_CHAR
        or per_char * len(value) < SECRET_MIN_BITS
    ):
        return (
            "has too little entropy (a repeated pattern, or too few distinct characters): "
            "generate one (openssl rand -hex 32)"
        )
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOTORCADE_", extra="ignore")

    env: Literal["dev", "test", "production"] = Field(
        "dev", description="Deployment kind; `production` enforces the production checks."
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/motorcade",
        description="PostgreSQL URL (psycopg 3). `make dev`/`make test` start an embedded "
        "server when it is not set.",
    )
    database_pool_size: int = Field(
        10,
        ge=1,
        le=200,
        description="Connections per process (the pool may open as many again in overflow).",
    )
    database_pool_timeout_seconds: float = Field(
        5,
        gt=0,
        le=60,
        description="How long a request waits for a pooled connection before it answers 503 "
        "`UNAVAILABLE` with `Retry-After` (the pool is exhausted): shorter than a client's "
        "request budget, so the client hears back and retries.",
    )
    database_api_statement_timeout_seconds: float = Field(
        15,
        ge=0,
        description="PostgreSQL `statement_timeout` of the API's connections: a statement "
        "running longer is cancelled and the request answers 503 `UNAVAILABLE` with "
        "`Retry-After`. 0: none.",
    )
    database_api_lock_timeout_seconds: float = Field(
        5,
        ge=0,
        description="PostgreSQL `lock_timeout` of the API's connections: a request waiting "
        "longer for a row or advisory lock (the fleet-assignment lock of rollout creation and "
        "desired states included) answers 503 `UNAVAILABLE` with `Retry-After`. 0: none.",
    )
    database_ingest_statement_timeout_seconds: float = Field(
        15,
        ge=0,
        description="PostgreSQL `statement_timeout` of `motorcade ingest`'s connections (a "
        "telemetry group's COPY and merge). 0: none.",
    )
    database_ingest_lock_timeout_seconds: float = Field(
        5,
        ge=0,
        description="PostgreSQL `lock_timeout` of `motorcade ingest`'s connections. 0: none.",
    )
    database_worker_statement_timeout_seconds: float = Field(
        120,
        ge=0,
        description="PostgreSQL `statement_timeout` of the worker's activities (a failed "
        "attempt is retried by Temporal). The longest statements measured: planning 100,000 "
        "vehicles 1.35 s, a 10,000-vehicle stage issued in 0.4 s, a million planned in 9 s "
        "(bench/rollout_scale.py): ten times the worst. 0: none.",
    )
    database_worker_lock_timeout_seconds: float = Field(
        30,
        ge=0,
        description="PostgreSQL `lock_timeout` of the worker's activities. 0: none.",
    )
    database_idle_in_transaction_timeout_seconds: float = Field(
        60,
        ge=0,
        description="PostgreSQL `idle_in_transaction_session_timeout` of the API, ingest and "
        "worker connections: a transaction left open and idle longer is ended by the server "
        "(its locks released). Not applied to the stream's LISTEN connection (idle outside "
        "any transaction) nor to migrations. 0: none.",
    )
    temporal_address: str = Field("127.0.0.1:7233", description="Temporal frontend host:port.")
    temporal_namespace: str = Field("default", description="Temporal namespace.")
    worker_metrics_address: str = Field(
        "",
        description="host:port where `motorcade worker` serves Prometheus metrics: the Temporal "
        "SDK's (workflow and activity task latencies, pollers, ...) and the worker's own "
        "(`motorcade_gate_evaluations_total`); empty: not served.",
    )
    temporal_ui_url: str = Field(
        "http://127.0.0.1:8233", description="Base URL of the Temporal Web UI, for links."
    )
    api_host: str = Field("127.0.0.1", description="Address the API binds.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port the API binds.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); none."
    )
    log_format: Literal["console", "json"] = Field(
        "json", description="`json` for production, `console` for humans."
    )
    log_level: str = Field("INFO", description="Log level.")

    # Authentication.
    oidc_issuer: str | None = Field(None, description="OIDC issuer URL (the `iss` claim).")
    oidc_audience: str = Field("motorcade", description="Required `aud` claim.")
    oidc_jwks_url: str | None = Field(
        None, description="JWKS URL; discovered from the issuer's metadata when unset."
    )
    oidc_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"],
        description="Asymmetric algorithms accepted from the identity provider.",
    )
    oidc_client_id: str | None = Field(
        None,
        description="The dashboard's client id at the issuer: set, the dashboard at `/` signs "
        "in through the issuer (authorization code with PKCE; redirect URI "
        "`<public URL>/auth/callback`); unset, it asks for a token (`#token=...`).",
    )
    oidc_client_secret: SecretStr | None = Field(
        None, description="The dashboard's client secret, for an issuer that wants one."
    )
    oidc_scopes: str = Field(
        "openid profile", description="Scopes the dashboard asks the issuer for."
    )
    public_url: str | None = Field(
        None,
        description="The API's address as browsers reach it (behind a proxy), for the "
        "dashboard's OIDC redirect URI; unset: the address of the request.",
    )
    jwks_cache_seconds: int = Field(300, ge=0, description="How long fetched JWKS are cached.")
    jwks_timeout_seconds: float = Field(
        5,
        gt=0,
        le=60,
        description="Most one JWKS refresh (the issuer's discovery document, then its key "
        "set) may take. Refreshes are single-flight: however many requests need the keys, one "
        "refresh runs and they share its result, so no request waits longer than this once.",
    )
    jwks_stale_seconds: int = Field(
        3600,
        ge=0,
        description="While the identity provider cannot be reached, keys older than "
        "MOTORCADE_JWKS_CACHE_SECONDS are still used for at most this long past their expiry "
        "(stale-while-error); past it, tokens are refused until a refresh succeeds.",
    )
    jwks_min_refresh_seconds: float = Field(
        30,
        ge=0,
        description="The JWKS is fetched at most once per this many seconds: after a failed "
        "refresh the next is tried no sooner (an identity provider that is down costs one "
        "timeout per period, not one per request), and a token whose `kid` is not in the "
        "cached set triggers a refresh at most this often; meanwhile it is refused without a "
        "fetch.",
    )
    token_cache_entries: int = Field(
        250_000,
        ge=0,
        description="Verified tokens remembered per process, least recently used evicted "
        "first (about 1 KB each: the default holds a 250,000-vehicle fleet's device tokens in "
        "about 250 MB). A token seen again within MOTORCADE_TOKEN_CACHE_SECONDS is not "
        "verified again. 0 turns the cache off.",
    )
    token_cache_seconds: float = Field(
        300,
        ge=0,
        description="How long a verified token is trusted without checking its signature "
        "again (never past its `exp`); as long as the JWKS is cached, so a device that "
        "calls every few minutes is verified once per this period.",
    )
    dev_key: SecretStr | None = Field(
        None,
        description="HS256 key for dev tokens (`make dev` generates one under .motorcade/). "
        "Refused in production.",
    )
    token_leeway_seconds: int = Field(30, ge=0, le=300, description="Clock skew allowed.")

    # Rollout and fleet behaviour.
    offline_after_seconds: int = Field(
        DEFAULT_OFFLINE_AFTER_SECONDS, ge=10, description="No heartbeat this long: offline."
    )
    reconcile_interval_seconds: int = Field(
        60, ge=5, le=86400, description="How often the reconcile Schedule runs."
    )
    rollout_start_grace_seconds: int = Field(
        DEFAULT_ROLLOUT_START_GRACE_SECONDS,
        ge=0,
        le=86400,
        description="A `pending` rollout older than this whose workflow does not exist is "
        "started by the reconcile (the API's own start failed, timed out or never ran).",
    )
    # Telemetry ingestion (docs/telemetry.md).
    ingest_queue_max_items: int = Field(
        DEFAULT_INGEST_QUEUE_MAX_ITEMS,
        ge=1,
        description="Telemetry items (events + heartbeats) queued or being written per "
        "process; past it POST /telemetry answers 503 OVERLOADED with Retry-After.",
    )
    ingest_group_max_items: int = Field(
        DEFAULT_INGEST_GROUP_MAX_ITEMS,
        ge=1,
        description="Most telemetry items written in one transaction.",
    )
    ingest_group_wait_ms: float = Field(
        DEFAULT_INGEST_GROUP_WAIT_MS,
        ge=0,
        le=1000,
        description="How long a group waits for more requests to join.",
    )
    ingest_writers: int = Field(
        DEFAULT_INGEST_WRITERS,
        ge=1,
        le=32,
        description="Concurrent group-commit writers per process (more processes, not more "
        "writers, is what scales: docs/telemetry.md).",
    )
    ingest_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes `motorcade ingest` runs on its port (one per core is the rule "
        "for a machine given to ingestion); each has its own queue and writers.",
    )
    outcome_signal_interval_seconds: float = Field(
        0.5,
        ge=0,
        le=60,
        description="Telemetry that moves a rollout's vehicles signals its workflow (its gates "
        "look again at once), at most once per rollout per this many seconds per process.",
    )
    telemetry_refresh_seconds: int = Field(
        DEFAULT_TELEMETRY_REFRESH_SECONDS,
        ge=0,
        description="Heartbeats refresh the wide vehicles row's lastSeenAt at most this often "
        "(the narrow vehicle_telemetry row always); visible changes are written at once.",
    )
    telemetry_battery_step: int = Field(
        DEFAULT_TELEMETRY_BATTERY_STEP,
        ge=1,
        le=100,
        description="Battery change (points) written to the vehicles row at once.",
    )
    max_clock_skew_seconds: int = Field(
        DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        ge=0,
        le=86400,
        description="Telemetry dated (sentAt, occurredAt, epoch) more than this many seconds "
        "past the server's clock at receipt is refused (422); liveness is the receive time.",
    )
    max_seq_jump: int = Field(
        DEFAULT_MAX_SEQ_JUMP,
        ge=1,
        description="An event whose seq is more than this past both its vehicle's newest stored "
        "seq of the same epoch (0 in a new epoch) and the server's clock in milliseconds is "
        "refused (422).",
    )
    api_ingest: bool = Field(
        True, description="`motorcade api` also serves POST /telemetry and desired states."
    )
    trusted_keys_file: str | None = Field(
        None, description="JSON file of trusted ed25519 release-signing public keys."
    )
    scoped_vehicle_registration: bool = Field(
        False,
        description="An operator with scopes may register vehicles inside its scope (a taken"
        " id is then a 409 however the vehicle is scoped: it tells that the id exists).",
    )

    # Idempotency keys on POST (docs/api.md).
    idempotency_retention_hours: int = Field(
        24,
        ge=24,
        description="How long a POST's Idempotency-Key and its first response are kept "
        "(at least 24 h, SPEC.md); expired keys are purged and may be reused.",
    )
    idempotency_in_flight_timeout_seconds: int = Field(
        120,
        ge=30,
        description="A request still in flight under its key after this long, with nothing "
        "committed (its process died, or it is only slow), no longer blocks the key: a retry "
        "with the same body takes it over under a new fencing token, and the first request "
        "can then neither commit, store its response nor release the key. A key whose work "
        "committed is never taken over (docs/api.md).",
    )
    idempotency_purge_interval_seconds: int = Field(
        3600,
        ge=10,
        description="How often each API process deletes expired idempotency keys (audit "
        "entries are purged by the worker's retention Schedule, not here).",
    )
    audit_retention_days: int = Field(
        0,
        ge=0,
        description="Audit entries older than this many days are deleted (oldest first, in "
        "batches, by the retention Schedule); 0, the default, keeps them forever. Set it to "
        "what your compliance regime requires (docs/audit_log.md); nothing else ever deletes "
        "or changes an entry.",
    )
    # Retention (MOTORCADE_*_RETENTION_*; docs/operations.md, "The change feed and retention").
    retention_interval_seconds: int = Field(
        3600,
        ge=60,
        le=7 * 86400,
        description="How often the retention Schedule (`motorcade-retention`, ensured at "
        "worker start) purges the change feed, timeline events and audit entries past their "
        "retention.",
    )
    change_feed_retention_hours: int = Field(
        24,
        ge=1,
        le=24 * 365,
        description="Change-feed rows (the stream's events) older than this are deleted; a "
        "stream resumed from before the oldest kept row gets a `resync` event "
        "(EVENTS_EXPIRED). The newest row is always kept.",
    )
    timeline_retention_days: int = Field(
        90,
        ge=0,
        description="Vehicle timeline events received more than this many days ago are "
        "deleted, partition by partition, in batches; 0 keeps them forever. A vehicle's "
        "status does not depend on them (its latest event is kept on the vehicle).",
    )

    # Rate limits on writes (MOTORCADE_RATE_LIMIT_*; docs/api.md).
    rate_limit_writes_per_minute: float = Field(
        60,
        ge=0,
        description="Sustained writes (POST, PUT, PATCH, DELETE under /api/) per caller (token "
        "subject; client address without a valid token) per API process: a token bucket "
        "refilled at this rate. 0 turns the limit off. Past it: 429 RATE_LIMITED with "
        "Retry-After. POST /api/v1/telemetry is not counted here: it has its own limits "
        "(MOTORCADE_RATE_LIMIT_*_TELEMETRY_*).",
    )
    rate_limit_write_burst: int = Field(
        20, ge=1, description="Writes a caller may make at once before the rate applies."
    )
    # Telemetry is limited in items (events + heartbeats; a request costs at least 1, charged
    # before its body is read), per token subject, per process (docs/api.md, "Rate limits").
    rate_limit_device_telemetry_items_per_minute: float = Field(
        600,
        ge=0,
        description="Telemetry items (events + heartbeats) a device token (per subject) may "
        "post per minute per process: a token bucket refilled at this rate; every request "
        "costs at least 1, charged before its body is read. 0 turns the limit off. Past it: "
        "429 RATE_LIMITED with Retry-After.",
    )
    rate_limit_device_telemetry_burst: int = Field(
        2000,
        ge=1,
        description="Telemetry items a device may post at once (one full batch: 1,000 events "
        "and 1,000 heartbeats) before its rate applies.",
    )
    rate_limit_gateway_telemetry_items_per_minute: float = Field(
        120_000,
        ge=0,
        description="Telemetry items a gateway token (per subject) may post per minute per "
        "process (a gateway sends for many vehicles: size it for its fleet, e.g. two items a "
        "minute per vehicle behind it). 0 turns the limit off.",
    )
    rate_limit_gateway_telemetry_burst: int = Field(
        20_000, ge=1, description="Telemetry items a gateway may post at once."
    )

    # Request bodies (docs/api.md, "Request size").
    max_body_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="Largest request body on every route but POST /api/v1/telemetry, checked "
        "before the body is parsed and before authentication (Content-Length at once, a "
        "streamed body as it arrives): past it, 413 PAYLOAD_TOO_LARGE. Fits 10,000 vehicle "
        "ids of up to 48 characters in a rollout or 500 vehicles in one registration.",
    )
    telemetry_max_body_bytes: int = Field(
        DEFAULT_TELEMETRY_MAX_BODY_BYTES,
        ge=1024,
        description="Largest POST /api/v1/telemetry body (a full batch of 1,000 events and "
        "1,000 heartbeats fits in 1 MiB); past it, 413 PAYLOAD_TOO_LARGE.",
    )

    # Gateways and the operators' metrics credential (docs/security.md).
    allow_fleet_gateways: bool | None = Field(
        None,
        description="Whether a gateway token without any scope claim (regions, models, orgs) "
        "may post telemetry for the whole fleet. Unset: refused when MOTORCADE_ENV=production "
        "(403 FORBIDDEN), allowed otherwise (`make dev`'s simulator is such a gateway).",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="The bearer secret Prometheus sends to GET /metrics (an operator "
        "credential, never a user token); unset: /metrics answers 404. In production at "
        "least 32 characters, not a placeholder (openssl rand -hex 32).",
    )

    # Live updates (MOTORCADE_STREAM_*; docs/api.md, "Live updates").
    stream_ticket_secret: SecretStr | None = Field(
        None,
        description="HMAC secret of stream tickets (POST /api/v1/stream/tickets); every API "
        "replica needs the same one. Unset: derived from the dev key, else random per process "
        "(a ticket then works only on the replica that issued it). In production at least 32 "
        "bytes, not a placeholder, not a repeated pattern (openssl rand -hex 32).",
    )
    stream_ticket_seconds: int = Field(
        60,
        ge=1,
        le=3600,
        description="How long a stream ticket is valid; a stream opened with one ends when it "
        "expires (the browser then mints a new ticket and resumes with lastEventId=).",
    )
    stream_keepalive_seconds: float = Field(
        15, gt=0, le=300, description="Seconds between keep-alive comments on an idle stream."
    )
    stream_stall_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description="A stream whose client has read nothing for this long (a write to it "
        "still blocked) is closed; checked at each keep-alive.",
    )
    stream_queue_max_events: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Events a stream subscriber may have unread; past it the subscriber gets "
        "a final resync event and its stream is closed.",
    )
    stream_queue_max_bytes: int = Field(
        8 << 20,
        ge=64 << 10,
        le=1 << 30,
        description="Bytes (as sent) a stream subscriber may have unread; past it the "
        "subscriber gets a final resync event (SLOW_SUBSCRIBER) and its stream is closed. "
        "Bounds a stream's memory (a vehicle.updated event of 500 deltas is about 75 KB).",
    )
    stream_max_per_caller: int = Field(
        8,
        ge=0,
        le=10_000,
        description="Open streams one caller (token subject) may hold on one API process; one "
        "more answers 429 RATE_LIMITED with Retry-After. 0: no cap.",
    )
    stream_backfill_pool_size: int = Field(
        4,
        ge=1,
        le=100,
        description="PostgreSQL connections per API process for resume reads (a stream "
        "opened with Last-Event-ID); more resumes at once wait for one.",
    )
    stream_poll_seconds: float = Field(
        5,
        gt=0,
        le=300,
        description="The change feed is read on every notification and at least this often.",
    )

    # Fleet default safety policy (MOTORCADE_SAFETY_*).
    safety_require_stationary: bool = Field(
        DEFAULT_REQUIRE_STATIONARY, description="Default: vehicle must be parked."
    )
    safety_min_battery_percent: int = Field(
        DEFAULT_MIN_BATTERY_PERCENT, ge=0, le=100, description="Default minimum battery."
    )

    @field_validator("database_url")
    @classmethod
    def _driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("cors_origins", "oidc_algorithms", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        bad = [alg for alg in value if alg.lower() == "none" or alg.upper().startswith("HS")]
        if bad:
            raise ValueError(f"identity-provider algorithms must be asymmetric, not {bad}")
        return value

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty value (`MOTORCADE_METRICS_TOKEN=` from docker-compose) is no token."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.dev_key is not None and len(self.dev_key.get_secret_value()) < 32:
            raise ValueError("MOTORCADE_DEV_KEY must be at least 32 characters")
        if self.env == "production":
            if self.dev_key is not None:
                raise ValueError("MOTORCADE_DEV_KEY is refused when MOTORCADE_ENV=production")
            if not self.oidc_issuer:
                raise ValueError("MOTORCADE_OIDC_ISSUER is required when MOTORCADE_ENV=production")
            if self.oidc_client_id and not (self.public_url or "").startswith("https://"):
                # Else the sign-in's redirect URI (and its cookies' Secure flag) would come from
                # each request's Host header and scheme.
                raise ValueError(
                    "MOTORCADE_PUBLIC_URL (https://...) is required with MOTORCADE_OIDC_CLIENT_ID "
                    "when MOTORCADE_ENV=production"
                )
            for name, secret in (
                ("MOTORCADE_STREAM_TICKET_SECRET", self.stream_ticket_secret),
                ("MOTORCADE_METRICS_TOKEN", self.metrics_token),
            ):
                weakness = secret_weakness(secret.get_secret_value()) if secret else None
                if weakness:
                    raise ValueError(f"{name} {weakness}")
        return self

    @property
    def fleet_gateways_allowed(self) -> bool:
        """MOTORCADE_ALLOW_FLEET_GATEWAYS, or its default for this environment."""
        if self.allow_fleet_gateways is not None:
            return self.allow_fleet_gateways
        return self.env != "production"

    @property
    def libpq_database_url(self) -> str:
        return libpq_url(self.database_url)


@lru_cache
def get_settings() -> Settings:
    return Settings()
