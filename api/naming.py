"""Names in the API's description that a generated client reads well: a short camelCase
operationId per operation (`listVehicles`, `pauseRollout`) and a plain name per schema
(`Vehicle`, `Rollout`, `RolloutPage`, `Error`), as SPEC.md asks.

The Python names stay as the code reads best (`RolloutOut`, `ListEnvelope[RolloutOut]`);
the description is renamed in one pass over the finished document, so a new model gets a
plain name by the same rules and a clash fails loudly here, never silently in a client.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.routing import APIRoute

# A route function's name when it does not say the resource on its own.
_OPERATION_IDS = {
    "healthz": "getHealthz",
    "readyz": "getReadyz",
    "metrics": "getMetrics",
    "get_timeline": "getVehicleTimeline",
    "get_timeline_legacy": "getVehicleEvents",
    "get_desired_state": "getVehicleDesiredState",
    "create_ticket": "createStreamTicket",
    "stream": "streamEvents",
    "fleet_summary": "getFleetSummary",
    "reconcile_report": "getReconcileReport",
    "health_report": "getHealthReport",
}

# Schemas whose plain name is not their Python name less `Out` / `In`.
_SCHEMA_NAMES = {
    "ErrorEnvelope": "Error",
    "EventIn": "TelemetryEvent",
    "HeartbeatIn": "Heartbeat",
    "VehicleIn": "VehicleCreate",
    "VehicleBatchIn": "VehicleBatchCreate",
    "ReleaseComponentIn": "ReleaseComponentCreate",
    "Envelope_list_VehicleOut__": "VehicleListResponse",
}

_ENVELOPE = re.compile(r"^Envelope_(?P<inner>[A-Za-z]+)_$")
_LIST_ENVELOPE = re.compile(r"^ListEnvelope_(?P<inner>[A-Za-z]+)_$")
PLAIN_SCHEMA_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
CAMEL_OPERATION_ID = re.compile(r"^[a-z]+(?:[A-Z][a-z0-9]*)*$")


def camel(name: str) -> str:
    """`pause_rollout` -> `pauseRollout` (and `rollout.updated` -> `rolloutUpdated`)."""
    first, *rest = name.replace(".", "_").split("_")
    return first + "".join(part.capitalize() for part in rest)


def operation_id(route: APIRoute) -> str:
    """FastAPI's `generate_unique_id_function`: the route function's name in camelCase."""
    return _OPERATION_IDS.get(route.name) or camel(route.name)


def _bare(name: str) -> str:
    if name in _SCHEMA_NAMES:
        return _SCHEMA_NAMES[name]
    for suffix in ("Out", "In"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def plain_schema_name(name: str) -> str:
    """`RolloutOut` → `Rollout`, `Envelope_RolloutOut_` → `RolloutResponse`,
    `ListEnvelope_RolloutOut_` → `RolloutPage`; others as `_SCHEMA_NAMES` says."""
    if name in _SCHEMA_NAMES:
        return _SCHEMA_NAMES[name]
    if match := _LIST_ENVELOPE.match(name):
        return _bare(match["inner"]) + "Page"
    if match := _ENVELOPE.match(name):
        return _bare(match["inner"]) + "Response"
    return _bare(name)


def rename_schemas(document: dict[str, Any]) -> None:
    """Give every schema of `document` its plain name and point every `$ref` at it."""
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    renamed: dict[str, str] = {}
    for name in schemas:
        plain = plain_schema_name(name)
        if plain in renamed.values():
            clash = next(old for old, new in renamed.items() if new == plain)
            raise ValueError(f"schemas {clash!r} and {name!r} would both be named {plain!r}")
        renamed[name] = plain
    document["components"]["schemas"] = {renamed[k]: v for k, v in schemas.items()}
    prefix = "#/components/schemas/"
    old_refs = {prefix + old: prefix + new for old, new in renamed.items() if old != new}

    def walk(node: Any) -> None:
        # `$ref`s, and a discriminator's mapping, whose values are references too.
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, str) and value in old_refs:
                node[key] = old_refs[value]
            elif isinstance(value, dict | list):
                walk(value)

    walk(document)
    for schema_name, schema in document["components"]["schemas"].items():
        if isinstance(schema, dict) and "title" in schema:
            schema["title"] = schema_name
        # A property's title is pydantic's `Bymodel` for `byModel`: generated clients name a
        # property's inline type after it (`FleetSummaryBymodel`). Without it they use the
        # property's own name (`FleetSummaryByModel`), and the description says the rest.
        for spec in (schema.get("properties") or {}).values() if isinstance(schema, dict) else ():
            spec.pop("title", None)
