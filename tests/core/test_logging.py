"""Redaction: tokens, secrets and Authorization headers never reach a log line."""

from __future__ import annotations

from core.logging import REDACTED, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_sensitive_keys_are_redacted_at_any_depth() -> None:
    event = {
        "event": "request",
        "headers": {"Authorization": f"Bearer {JWT}", "Accept": "json"},
        "payload": {"nested": [{"apiKey": "s3cret", "ok": 1}], "client_secret": "x"},
        "ticket": "abc",
    }
    out = redact(event)
    assert out["headers"]["Authorization"] == REDACTED
    assert out["headers"]["Accept"] == "json"
    assert out["payload"]["nested"][0] == {"apiKey": REDACTED, "ok": 1}
    assert out["payload"]["client_secret"] == REDACTED
    assert out["ticket"] == REDACTED


def test_tokens_inside_free_text_are_redacted() -> None:
    out = redact({"event": f"failed with Bearer {JWT} and {JWT}"})
    assert JWT not in out["event"]
    assert "Bearer [REDACTED]" in out["event"]
