"""docs/openapi.yaml is the canonical spec: it must equal what the app serves."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from devtools.openapi import openapi_document

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def test_committed_spec_matches_the_app() -> None:
    committed = yaml.safe_load(SPEC.read_text())
    assert committed == openapi_document(), "run `make openapi` and commit docs/openapi.yaml"


def test_spec_is_semver_and_documents_the_envelopes() -> None:
    doc = openapi_document()
    major, minor, patch = doc["info"]["version"].split(".")
    assert major == "1" and minor.isdigit() and patch.isdigit()
    schemas = doc["components"]["schemas"]
    assert "ErrorEnvelope" in schemas
    assert any(name.startswith("ListEnvelope") for name in schemas)
    get_vehicles = doc["paths"]["/api/v1/vehicles"]["get"]
    assert {"401", "403", "422"} <= set(get_vehicles["responses"])
    assert doc["paths"]["/healthz"]["get"]["security"] == []


async def test_served_spec_is_the_same(http: httpx.AsyncClient, viewer: dict) -> None:
    served = (await http.get("/openapi.json", headers=viewer)).json()
    assert served == openapi_document()
