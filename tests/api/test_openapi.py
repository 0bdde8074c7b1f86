"""docs/openapi.yaml is the canonical spec: it must equal what the app serves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from api.naming import CAMEL_OPERATION_ID, PLAIN_SCHEMA_NAME, rename_schemas
from core.errors import error_codes
from devtools.openapi import asyncapi_document, openapi_document

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
ASYNCAPI = SPEC.parent / "asyncapi.yaml"


def test_committed_spec_matches_the_app() -> None:
    committed = yaml.safe_load(SPEC.read_text())
    assert committed == openapi_document(), "run `make openapi` and commit docs/openapi.yaml"


def test_committed_asyncapi_matches_the_app() -> None:
    committed = yaml.safe_load(ASYNCAPI.read_text())
    assert committed == asyncapi_document(), "run `make openapi` and commit docs/asyncapi.yaml"
    assert committed["asyncapi"].startswith("3.")
    messages = committed["channels"]["stream"]["messages"].values()
    assert {m["name"] for m in messages} == {
        "vehicle.updated",
        "rollout.updated",
        "audit.created",
        "fleet.summary",
        "resync",
    }
    # Shared with REST: the rollout's event names its fields as GET /rollouts/{id} does.
    doc = openapi_document()["components"]["schemas"]
    event = doc["RolloutUpdatedEvent"]["properties"]
    assert event["progress"] == doc["Rollout"]["properties"]["progress"]
    for name in ("status", "stage", "stageIndex", "stageCount", "waitingFor", "statusReason"):
        assert name in doc["Rollout"]["properties"], name


def test_spec_is_semver_and_documents_the_envelopes() -> None:
    doc = openapi_document()
    major, minor, patch = doc["info"]["version"].split(".")
    assert major == "1" and minor.isdigit() and patch.isdigit()
    schemas = doc["components"]["schemas"]
    assert {"Error", "Vehicle", "VehiclePage", "Rollout", "RolloutResponse"} <= set(schemas)
    error = doc["paths"]["/api/v1/vehicles"]["get"]["responses"]["401"]
    assert error["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    get_vehicles = doc["paths"]["/api/v1/vehicles"]["get"]
    assert {"401", "403", "422"} <= set(get_vehicles["responses"])
    assert doc["paths"]["/healthz"]["get"]["security"] == []


def test_every_operation_id_is_short_camel_case_and_every_schema_name_plain() -> None:
    doc = openapi_document()
    operations = [
        operation
        for path in doc["paths"].values()
        for method, operation in path.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for operation_id in ids:
        assert CAMEL_OPERATION_ID.match(operation_id), operation_id
        assert len(operation_id) <= 24, operation_id
    for name, schema in doc["components"]["schemas"].items():
        assert PLAIN_SCHEMA_NAME.match(name), name
        assert not name.endswith(("Out", "In")), name
        assert schema.get("title", name) == name
    refs = re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc))
    assert set(refs) <= set(doc["components"]["schemas"]), "every $ref resolves"


SPEC_ERROR_CODES = {  # ../shared/SPEC.md, "HTTP conventions"
    "VALIDATION_ERROR", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
    "INVALID_STATE_TRANSITION", "IDEMPOTENCY_KEY_IN_USE", "IDEMPOTENCY_KEY_MISMATCH",
    "SAFETY_POLICY_WEAKENED", "RELEASE_SIGNATURE_INVALID", "RATE_LIMITED", "OVERLOADED",
    "INTERNAL",
}  # fmt: skip


def test_the_error_codes_are_an_enum_of_every_code_the_api_sends() -> None:
    code = openapi_document()["components"]["schemas"]["ErrorBody"]["properties"]["code"]
    assert code["enum"] == error_codes()
    assert SPEC_ERROR_CODES <= set(code["enum"])
    assert "HTTP_ERROR" in code["enum"]  # a framework 4xx no class names


async def test_a_missing_docs_asset_is_the_error_envelope(http: httpx.AsyncClient) -> None:
    response = await http.get("/docs/assets/no-such-file.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


def test_the_ingest_process_names_each_schema_as_the_api_does() -> None:
    """A schema's name never depends on which routes a process mounts (the ingest role has
    fewer, so FastAPI would not qualify a name that clashes only in the full app)."""
    ingest = openapi_document(role="ingest")["components"]["schemas"]
    full = openapi_document()["components"]["schemas"]
    assert ingest.keys() <= full.keys(), sorted(ingest.keys() - full.keys())
    for name, schema in ingest.items():
        assert schema == full[name], name


def test_a_schema_name_clash_fails_loudly() -> None:
    document: dict[str, Any] = {"components": {"schemas": {"RolloutOut": {}, "Rollout": {}}}}
    with pytest.raises(ValueError, match="would both be named 'Rollout'"):
        rename_schemas(document)


async def test_served_spec_is_the_same_and_public(http: httpx.AsyncClient) -> None:
    served = await http.get("/openapi.json")  # no token: the description is public
    assert served.status_code == 200
    assert served.json() == openapi_document()


async def test_docs_are_public_and_load_nothing_from_elsewhere(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assets += re.findall(r"url: '([^']+)'", page.text)
    assert assets, page.text
    for asset in assets:
        assert asset.startswith("/"), f"/docs loads {asset} from another origin"
        loaded = await http.get(asset)
        assert loaded.status_code == 200, asset
        assert loaded.content, asset
    # A bad or unsatisfiable Range is ignored (the whole file), never a plain-text 400 or 416.
    for bad in ("bytes=x", "bytes=999999999-"):
        whole = await http.get("/docs/assets/swagger-ui.css", headers={"Range": bad})
        assert whole.status_code == 200, (bad, whole.text[:100])
