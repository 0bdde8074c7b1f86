"""docs/openapi.yaml explains itself: a description on every field of every schema, an
example on every request and response body, and every example valid against the schema it
illustrates (the document a dashboard team reads in /docs and generates a client from)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from api.app import create_app
from api.examples import ERROR_FOR_STATUS, add_examples, error_statuses
from api.schemadocs import describe_fields, describe_parameters
from core.settings import Settings
from tests.streamschema import DOCS, schema_validator


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load((DOCS / "openapi.yaml").read_text())


def test_every_field_has_a_description(document: dict[str, Any]) -> None:
    bare = [
        f"{name}.{field}"
        for name, schema in document["components"]["schemas"].items()
        for field, spec in (schema.get("properties") or {}).items()
        if not spec.get("description")
    ]
    assert bare == []
    # ... and none is owed to luck: the app's own document left to itself finds them all.
    app = create_app(Settings(env="test", _env_file=None))  # type: ignore[call-arg]
    assert describe_fields(copy.deepcopy(app.openapi())) == []


def test_every_parameter_has_a_description(document: dict[str, Any]) -> None:
    bare = [
        f"{operation['operationId']}.{parameter['name']}"
        for operations in document["paths"].values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if not (parameter.get("description") or parameter["schema"].get("description"))
    ]
    assert bare == []
    app = create_app(Settings(env="test", _env_file=None))  # type: ignore[call-arg]
    assert describe_parameters(copy.deepcopy(app.openapi())) == []


def bodies(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            request = (operation.get("requestBody") or {}).get("content", {})
            for media, content in request.items():
                out.append((f"{method.upper()} {path} request {media}", content))
            for status, response in operation["responses"].items():
                for media, content in (response.get("content") or {}).items():
                    out.append((f"{method.upper()} {path} {status} {media}", content))
    return out


def test_every_body_has_an_example_that_its_schema_accepts(document: dict[str, Any]) -> None:
    found = bodies(document)
    assert len(found) > 150  # every operation's bodies, the error answers included
    without = [
        label for label, content in found if "example" not in content and "examples" not in content
    ]
    assert without == []
    invalid = []
    for label, content in found:
        if not label.endswith("application/json"):
            continue
        validator = schema_validator(document["components"], content["schema"])
        values = (
            [content["example"]]
            if "example" in content
            else [e["value"] for e in content["examples"].values()]
        )
        for value in values:
            invalid += [f"{label}: {error}" for error in validator.iter_errors(value)]
    assert invalid == []
    app = create_app(Settings(env="test", _env_file=None))  # type: ignore[call-arg]
    assert add_examples(copy.deepcopy(app.openapi())) == []


def test_an_error_example_for_every_status_an_error_has() -> None:
    assert error_statuses() <= set(ERROR_FOR_STATUS)


def test_the_stream_and_export_examples_parse(document: dict[str, Any]) -> None:
    stream = document["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]
    assert "event: rollout.updated" in stream["text/event-stream"]["example"]
    export = document["paths"]["/api/v1/audit-log/export"]["get"]["responses"]["200"]
    line = export["content"]["application/x-ndjson"]["example"].splitlines()[0]
    entry = yaml.safe_load(line)
    validator = schema_validator(
        document["components"], {"$ref": "#/components/schemas/AuditEntry"}
    )
    assert list(validator.iter_errors(entry)) == []
