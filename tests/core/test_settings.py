"""Settings validate themselves."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings

KEY = "k" * 40
ISSUER = "https://id.example"
ENV_EXAMPLE = (Path(__file__).parents[2] / ".env.example").read_text()
PLACEHOLDER = next(
    line.partition("=")[2]
    for line in ENV_EXAMPLE.splitlines()
    if line.startswith("MOTORCADE_STREAM_TICKET_SECRET=")
)


def make(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[arg-type, call-arg]


def test_defaults_are_documented_and_sane() -> None:
    s = make()
    assert s.env == "dev"
    assert s.offline_after_seconds == 300
    assert s.cors_origins == []
    assert s.database_url.startswith("postgresql+psycopg://")
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_production_refuses_the_dev_key() -> None:
    with pytest.raises(ValidationError, match="MOTORCADE_DEV_KEY is refused"):
        make(env="production", dev_key=KEY, oidc_issuer="https://id.example")


def test_production_requires_an_issuer() -> None:
    with pytest.raises(ValidationError, match="MOTORCADE_OIDC_ISSUER is required"):
        make(env="production")
    assert make(env="production", oidc_issuer="https://id.example").env == "production"


def test_production_dashboard_sign_in_needs_its_public_url() -> None:
    base = {"env": "production", "oidc_issuer": "https://id.example", "oidc_client_id": "dash"}
    with pytest.raises(ValidationError, match="MOTORCADE_PUBLIC_URL"):
        make(**base)
    with pytest.raises(ValidationError, match="MOTORCADE_PUBLIC_URL"):
        make(**base, public_url="http://motorcade.example")
    assert make(**base, public_url="https://motorcade.example").public_url


def test_short_dev_key_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32"):
        make(dev_key="short")


def test_symmetric_algorithms_refused_for_the_identity_provider() -> None:
    with pytest.raises(ValidationError, match="asymmetric"):
        make(oidc_algorithms="RS256,HS256")
    with pytest.raises(ValidationError, match="asymmetric"):
        make(oidc_algorithms=["none"])


def test_database_url_forms() -> None:
    assert make(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValidationError, match="postgresql://"):
        make(database_url="mysql://u@h/db")


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTORCADE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("MOTORCADE_OFFLINE_AFTER_SECONDS", "120")
    monkeypatch.setenv("MOTORCADE_ENV", "staging")
    with pytest.raises(ValidationError, match="env"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("MOTORCADE_ENV", "dev")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.offline_after_seconds == 120


def test_secrets_do_not_show_in_repr() -> None:
    assert KEY not in repr(make(dev_key=KEY))


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (PLACEHOLDER, "placeholder"),
        ("CHANGE-ME-" + secrets.token_hex(32), "placeholder"),
        (secrets.token_hex(15), "at least 32 bytes"),
        ("x" * 64, "entropy"),
        ("0123456789abcdef" * 4, "entropy"),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "entropy"),
    ],
    ids=["env-example", "placeholder-marker", "short", "one-char", "pattern", "low-entropy"],
)
def test_production_refuses_a_weak_stream_ticket_secret(secret: str, why: str) -> None:
    """A ticket secret an attacker can guess mints feed-wide tickets: production refuses to
    start with one, and says why."""
    with pytest.raises(ValidationError, match="MOTORCADE_STREAM_TICKET_SECRET ") as info:
        make(env="production", oidc_issuer=ISSUER, stream_ticket_secret=secret)
    assert why in str(info.value) and "openssl rand -hex 32" in str(info.value)
    assert secret not in str(info.value)  # the message does not repeat the secret
    make(env="test", stream_ticket_secret=secret)  # outside production: accepted


def test_production_accepts_a_generated_stream_ticket_secret() -> None:
    for secret in (secrets.token_hex(32), secrets.token_urlsafe(32), None):
        settings = make(env="production", oidc_issuer=ISSUER, stream_ticket_secret=secret)
        assert settings.env == "production"


PROD = {"env": "production", "oidc_issuer": "https://id.example"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("short", "at least 32"),
        ("change-me-openssl-rand-hex-32-change-me", "placeholder"),
        ("ab" * 20, "distinct"),
    ],
)
def test_production_refuses_a_weak_metrics_token(value: str, why: str) -> None:
    with pytest.raises(ValidationError, match=f"MOTORCADE_METRICS_TOKEN .*{why}"):
        make(**PROD, metrics_token=value)


def test_metrics_token_strong_or_unset() -> None:
    strong = "3f9c1e7a5b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e"
    assert make(**PROD, metrics_token=strong).metrics_token is not None
    assert make(**PROD).metrics_token is None  # /metrics off
    assert make(**PROD, metrics_token="").metrics_token is None  # compose's empty default
    assert make(metrics_token="dev").metrics_token is not None  # dev: any value


def test_fleet_wide_gateways_refused_by_default_in_production_only() -> None:
    assert make(**PROD).fleet_gateways_allowed is False
    assert make(**PROD, allow_fleet_gateways=True).fleet_gateways_allowed is True
    assert make().fleet_gateways_allowed is True  # dev: make dev's simulator is one
    assert make(env="test").fleet_gateways_allowed is True
    assert make(allow_fleet_gateways=False).fleet_gateways_allowed is False


def test_every_limit_is_on_by_default_and_telemetry_has_the_larger_body() -> None:
    s = make()
    assert s.rate_limit_device_telemetry_items_per_minute > 0
    assert s.rate_limit_gateway_telemetry_items_per_minute > (
        s.rate_limit_device_telemetry_items_per_minute
    )
    assert s.telemetry_max_body_bytes > s.max_body_bytes > 0
