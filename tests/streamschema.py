"""The stream's events against docs/asyncapi.yaml: every event a test's stream reader receives
(tests/api/stream's `SSE`) goes through `check_event`, so the suite checks every event its
streams are sent, not a sample. Each message's payload is a `$ref` into docs/openapi.yaml,
whose components resolve its own references."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

DOCS = Path(__file__).resolve().parent.parent / "docs"


def schema_validator(components: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A validator of `schema`, whose `$ref`s point into these OpenAPI components."""
    return jsonschema_rs.Draft202012Validator(
        {"components": components, **schema}, validate_formats=True
    )


@functools.cache
def _messages() -> dict[str, tuple[Any, re.Pattern[str] | None]]:
    """Event name -> (payload validator, pattern its `id` must match, None: no id)."""
    asyncapi = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    openapi = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    out: dict[str, tuple[Any, re.Pattern[str] | None]] = {}
    for message in asyncapi["channels"]["stream"]["messages"].values():
        file, _, pointer = message["payload"]["$ref"].partition("#")
        assert file == "./openapi.yaml", message["payload"]
        name = pointer.rsplit("/", 1)[1]
        validator = schema_validator(openapi["components"], openapi["components"]["schemas"][name])
        headers = message.get("headers", {})
        id_pattern = None
        if "id" in headers.get("required", []):
            id_pattern = re.compile(headers["properties"]["id"]["pattern"])
        out[message["name"]] = (validator, id_pattern)
    return out


def check_event(event: dict[str, Any]) -> None:
    """Fail (AssertionError) unless `event` (`event`, `data` parsed, `id`) is a message of
    docs/asyncapi.yaml with a payload and id as described there."""
    name = event.get("event")
    messages = _messages()
    assert name in messages, f"event {name!r} is not in docs/asyncapi.yaml: {event}"
    validator, id_pattern = messages[name]
    errors = [str(error) for error in validator.iter_errors(event.get("data"))]
    assert not errors, f"{name} does not match docs/asyncapi.yaml: {errors}; data {event}"
    if id_pattern is None:
        assert "id" not in event, f"{name} carries an id: {event}"
    else:
        assert id_pattern.match(event.get("id", "")), f"{name} without a valid id: {event}"
