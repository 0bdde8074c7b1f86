"""An example on every request and response body of `docs/openapi.yaml`: what `/docs` shows
and what a dashboard developer copies first.

Each resource has one example (`RESOURCES`, by plain schema name); an answer's envelope, a
page and an error are built around them the way the API builds its answers, so the examples
of one resource agree everywhere. `tests/api/test_openapi_docs.py` validates every example
against the schema it illustrates, and fails on a body left without one.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from core.errors import error_classes
from services.rollouts.status import snapshot_of

REQUEST_ID = "5f0c8a7e-3b1d-4c52-9a0e-7d2f6b1c9e44"
AT = "2026-11-20T09:30:00.000Z"
DESIRED_STATE_ID = "0b6f3c2e-8d4a-4f1e-9c7b-2a5d8e1f4c90"

VEHICLE = {
    "id": "VIN-00042",
    "model": "atlas",
    "region": "eu-west",
    "ring": "broad",
    "org": "default",
    "metadata": {"plant": "leipzig"},
    "desired": {"releaseVersion": "2026.11.0", "desiredStateId": DESIRED_STATE_ID, "rolloutId": 12},
    "actual": {"releaseVersion": "2026.10.2"},
    "status": "updating",
    "reasonCodes": [],
    "lastSeenAt": "2026-11-20T09:29:41.000Z",
    "batteryPercent": 81,
    "stationary": True,
    "updatedAt": "2026-11-20T09:29:41.000Z",
}

TARGETS = {"regions": ["eu-west"], "models": ["atlas"]}
STRATEGY = {
    "canary": {"size": 5, "bakeSeconds": 1800},
    "waves": [{"percent": 25, "bakeSeconds": 3600}, {"percent": 100, "bakeSeconds": 0}],
}
GATES = {
    "canaryHealthy": {"minSuccessRate": 0.95, "minSamples": 5},
    "failureThreshold": {"maxFailureRate": 0.05, "action": "pause"},
    "safetyChecks": {"requireStationary": True, "minBatteryPercent": 30},
}
PROGRESS = {
    "targeted": 1200,
    "notified": 300,
    "updating": 160,
    "succeeded": 118,
    "failed": 2,
    "blocked": 0,
    "pending": 900,
}
ROLLOUT = {
    "id": 12,
    "name": "November infotainment",
    "releaseVersion": "2026.11.0",
    "status": "running",
    "statusReason": None,
    "stage": "wave-1",
    "stageIndex": 1,
    "stageCount": 3,
    "waitingFor": "wave-1: 120 of 295 vehicles settled",
    "targets": TARGETS,
    "strategy": STRATEGY,
    "gates": GATES,
    "timeouts": {"applySeconds": 3600},
    "retry": {"maxAttempts": 3, "backoffSeconds": 300},
    "progress": PROGRESS,
    "stages": [
        {"index": 0, "name": "canary", "vehicles": 5, "bakeSeconds": 1800},
        {"index": 1, "name": "wave-1", "vehicles": 295, "bakeSeconds": 3600},
        {"index": 2, "name": "wave-2", "vehicles": 900, "bakeSeconds": 0},
    ],
    "workflowId": "rollout-12",
    "temporalUiUrl": "http://127.0.0.1:8233/namespaces/default/workflows/rollout-12",
    "createdBy": "alice@example.com",
    "createdAt": "2026-11-20T08:00:00.000Z",
    "updatedAt": "2026-11-20T09:29:58.000Z",
    "startedAt": "2026-11-20T08:00:01.000Z",
    "finishedAt": None,
}
COMPONENTS = [
    {"name": "infotainment", "version": "8.4.1"},
    {"name": "telematics", "version": "3.2.0"},
]
RELEASE = {
    "version": "2026.11.0",
    "components": COMPONENTS,
    "artifactDigest": "sha256:" + "9f2c" * 16,
    "signature": "b64:Jx3lQm5v0Qq1n8mQw4N2XfQ2a1c9bX2v7Yy1s3Lr6n0u8p4k2d9f0g1h2j3k4l5m6n7o8p9q0r==",
    "signingKeyId": "release-2026",
    "notes": "Navigation fixes.",
    "createdBy": "release-bot",
    "createdAt": "2026-11-18T15:00:00.000Z",
}
AUDIT_ENTRY = {
    "id": 4711,
    "at": AT,
    "actor": "alice@example.com",
    "role": "operator",
    "source": "api",
    "action": "rollout.pause_requested",
    "targetType": "rollout",
    "targetId": "12",
    "reason": "investigating telemetry from eu-west",
    "correlationId": REQUEST_ID,
    "payload": {"action": "pause"},
    "result": "ok",
}
TIMELINE_EVENT = {
    "eventId": "9a7c1e3f-2b4d-4c6e-8f0a-1b3d5e7f9a20",
    "vehicleId": "VIN-00042",
    "seq": 57,
    "epoch": 1,
    "type": "apply_start",
    "occurredAt": "2026-11-20T09:21:03.000Z",
    "receivedAt": "2026-11-20T09:21:04.000Z",
    "desiredStateId": DESIRED_STATE_ID,
    "releaseVersion": "2026.11.0",
    "reasonCode": None,
    "details": {"progressPercent": 10},
}
CONSTRAINTS = {
    "minBatteryPercent": 30,
    "requireStationary": True,
    "maintenanceWindow": {
        "start": "22:00",
        "end": "05:00",
        "timezone": "Europe/Berlin",
        "days": ["mon", "tue", "wed", "thu", "fri"],
    },
}
DESIRED_STATE = {
    "id": DESIRED_STATE_ID,
    "vehicleId": None,
    "releaseVersion": "2026.11.0",
    "rolloutId": 12,
    "previousDesiredStateId": None,
    "reason": None,
    "createdBy": "alice@example.com",
    "createdAt": "2026-11-20T08:40:00.000Z",
    "constraints": CONSTRAINTS,
}
PLACE = {"total": 600, "byStatus": {"in_sync": 540, "updating": 52, "failed": 2, "offline": 6}}
FLEET = {
    "asOf": "2026-11-20T09:30:00.000Z",
    "total": 1200,
    "byStatus": {
        "in_sync": 1012,
        "pending": 20,
        "updating": 160,
        "blocked": 0,
        "failed": 2,
        "offline": 6,
    },
    "byModel": {"atlas": PLACE, "borealis": PLACE},
    "byRegion": {"eu-west": {"total": 1200, "byStatus": {"in_sync": 1012, "updating": 180}}},
    "byRing": {"broad": {"total": 1200, "byStatus": {"in_sync": 1012, "updating": 180}}},
    "topReasonCodes": [{"reasonCode": "INSTALL_FAILED", "vehicles": 2}],
}

RESOURCES: dict[str, Any] = {
    "Vehicle": VEHICLE,
    "Rollout": ROLLOUT,
    "Release": RELEASE,
    "AuditEntry": AUDIT_ENTRY,
    "TimelineEvent": TIMELINE_EVENT,
    "DesiredState": DESIRED_STATE,
    "FleetSummary": FLEET,
    "RolloutVehicle": {
        "vehicleId": "VIN-00042",
        "stage": "wave-1",
        "stageIndex": 1,
        "state": "updating",
        "attempt": 1,
        "reasonCode": None,
        "desiredStateId": DESIRED_STATE_ID,
        "notifiedAt": "2026-11-20T09:20:00.000Z",
        "updatedAt": "2026-11-20T09:21:04.000Z",
        "model": "atlas",
        "region": "eu-west",
        "ring": "broad",
        "vehicleStatus": "updating",
    },
    "VehicleDesiredState": {
        "vehicleId": "VIN-00042",
        "desiredStateId": DESIRED_STATE_ID,
        "releaseVersion": "2026.11.0",
        "rolloutId": 12,
        "components": COMPONENTS,
        "artifactDigest": RELEASE["artifactDigest"],
        "signature": RELEASE["signature"],
        "signingKeyId": "release-2026",
        "createdAt": "2026-11-20T08:40:00.000Z",
        "constraints": CONSTRAINTS,
    },
    "DesiredStatesCreated": {
        "releaseVersion": "2026.11.0",
        "count": 2,
        "sample": [
            {"vehicleId": "VIN-00042", "desiredStateId": "3c1e7a90-5b2d-4e8f-a6c4-9d0b1f2e3a71"},
            {"vehicleId": "VIN-00043", "desiredStateId": "7e2d4b18-9a3c-4f5e-b1d6-0c8a2e4f6b93"},
        ],
        "safetyChecks": {"requireStationary": True, "minBatteryPercent": 30},
    },
    "HealthReport": {
        "total": 1200,
        "byStatus": FLEET["byStatus"],
        "offline": 6,
        "topReasonCodes": [{"reasonCode": "INSTALL_FAILED", "vehicles": 2}],
    },
    "ReconcileReport": {
        "latest": {
            "id": 311,
            "runKey": "reconcile-2026-11-20T09:30:00Z",
            "startedAt": "2026-11-20T09:30:00.000Z",
            "finishedAt": "2026-11-20T09:30:02.000Z",
            "markedOffline": 1,
            "drifted": 3,
        },
        "drift": [
            {
                "desiredReleaseVersion": "2026.11.0",
                "actualReleaseVersion": "2026.10.2",
                "status": "failed",
                "region": "eu-west",
                "model": "atlas",
                "org": "default",
                "vehicles": 2,
            }
        ],
        "driftTruncated": False,
        "recentRuns": [],
    },
    "Health": {"status": "ok"},
    "Readiness": {
        "status": "ok",
        "checks": {"database": "ok", "temporal": "ok", "pool": "ok"},
    },
    "StreamTicket": {
        "ticket": "eyJleHAiOjE3OTUxNjgyNjAsInN1YiI6ImFsaWNlIn0"
        ".3q2-7wXk0cJb1aQyVZ8rT5uN2mE4sH6gL9pD0fA1bC8",
        "expiresAt": AT,
    },
    "TelemetryAccepted": {"accepted": 2, "duplicates": 0, "heartbeats": 1},
    "Caller": {
        "subject": "alice@example.com",
        "role": "operator",
        "canWrite": True,
        "regions": ["eu-west"],
        "models": None,
        "orgs": None,
        "vehicleId": None,
        "expiresAt": "2026-11-20T10:30:00.000Z",
    },
    "RolloutControl": {
        "rollout": {
            **ROLLOUT,
            "status": "paused",
            "statusReason": "OPERATOR",
            "waitingFor": "resume",
        },
        "control": {"action": "pause", "status": "paused", "paused": True},
    },
    "RolloutPlan": {
        "releaseVersion": "2026.11.0",
        "targeted": 1200,
        "stages": ROLLOUT["stages"],
        "safety": {
            "requireStationary": True,
            "minBatteryPercent": 30,
            "blocked": 14,
            "batteryLow": 9,
            "notStationary": 5,
            "unknown": 0,
            "offline": 6,
        },
        "weakenedSafety": [],
        "maintenanceWindow": None,
        "overlap": {"vehicles": 0, "sampleVehicleIds": [], "rolloutIds": []},
        "canStart": True,
        "problems": [],
    },
    # Request bodies.
    "RolloutCreate": {
        "name": "November infotainment",
        "releaseVersion": "2026.11.0",
        "targets": TARGETS,
        "strategy": STRATEGY,
        "gates": GATES,
        "reason": "monthly release, approved in CAB-311",
    },
    "ReleaseCreate": {
        "version": "2026.11.0",
        "components": COMPONENTS,
        "artifactDigest": RELEASE["artifactDigest"],
        "signature": RELEASE["signature"],
        "signingKeyId": "release-2026",
        "notes": "Navigation fixes.",
    },
    "VehicleCreate": {"id": "VIN-00042", "model": "atlas", "region": "eu-west", "ring": "broad"},
    "VehicleBatchCreate": {
        "vehicles": [
            {"id": "VIN-00042", "model": "atlas", "region": "eu-west", "ring": "broad"},
            {"id": "VIN-00043", "model": "atlas", "region": "eu-west", "ring": "canary"},
        ]
    },
    "DesiredStateCreate": {
        "releaseVersion": "2026.11.0",
        "targets": {"vehicleIds": ["VIN-00042"]},
        "reason": "hotfix for one vehicle, ticket OPS-88",
    },
    "ControlBody": {"reason": "investigating telemetry from eu-west"},
    "TelemetryBatch": {
        "heartbeats": [
            {
                "vehicleId": "VIN-00042",
                "sentAt": "2026-11-20T09:21:04.000Z",
                "batteryPercent": 81,
                "stationary": True,
                "actualReleaseVersion": "2026.10.2",
            }
        ],
        # The event as the vehicle sends it: the timeline's, without what the server adds.
        "events": [{k: v for k, v in TIMELINE_EVENT.items() if k not in ("receivedAt", "details")}],
    },
}
RESOURCES["VehicleList"] = [VEHICLE]

# The code an error answer of each status most often carries (its example).
ERROR_FOR_STATUS = {
    401: ("UNAUTHENTICATED", "missing or invalid bearer token"),
    403: ("FORBIDDEN", "this needs the operator role"),
    404: ("NOT_FOUND", "rollout 12 not found"),
    409: ("INVALID_STATE_TRANSITION", "cannot resume: rollout is running, not paused"),
    413: ("PAYLOAD_TOO_LARGE", "the body is larger than 1048576 bytes"),
    405: ("METHOD_NOT_ALLOWED", "method not allowed"),
    422: ("VALIDATION_ERROR", "the request is not valid"),
    429: ("RATE_LIMITED", "too many writes: retry after 2 s"),
    500: ("INTERNAL", "internal error"),
    503: ("UNAVAILABLE", "Temporal did not answer in time: retry"),
}


def envelope(data: Any) -> dict[str, Any]:
    return {"data": data, "metadata": {"requestId": REQUEST_ID}, "timestamp": AT}


def page(item: Any) -> dict[str, Any]:
    return {
        "data": [item],
        "metadata": {
            "requestId": REQUEST_ID,
            "limit": 50,
            "nextCursor": "eyJpZCI6IFsiVklOLTAwMDQyIl19",
            "hasMore": True,
        },
        "timestamp": AT,
    }


def error(status: int) -> dict[str, Any]:
    code, message = ERROR_FOR_STATUS[status]
    details = (
        [{"field": "strategy.waves", "message": "the last wave must end at 100"}]
        if status == 422
        else []
    )
    return {
        "error": {"code": code, "message": message, "details": details},
        "metadata": {"requestId": REQUEST_ID},
        "timestamp": AT,
    }


def example_for(schema_name: str, status: int | None) -> Any:
    """The example of an answer or body of this (plain) schema; None when it has none."""
    if schema_name == "Error" and status is not None:
        return error(status)
    if schema_name.endswith("Page") and schema_name[: -len("Page")] in RESOURCES:
        return page(RESOURCES[schema_name[: -len("Page")]])
    if schema_name.endswith("Response") and schema_name[: -len("Response")] in RESOURCES:
        data = RESOURCES[schema_name[: -len("Response")]]
        if schema_name == "ReadinessResponse" and status == 503:
            data = {
                "status": "unavailable",
                "checks": {"database": "ok", "temporal": "unavailable", "pool": "ok"},
            }
        return envelope(data)
    return RESOURCES.get(schema_name)


NDJSON = json.dumps(AUDIT_ENTRY) + "\n"  # one entry per line
# The stream's `rollout.updated` for ROLLOUT, built as the worker builds it (its row's
# columns through `snapshot_of`).
ROLLOUT_UPDATED = snapshot_of(
    {
        "id": ROLLOUT["id"],
        "status": ROLLOUT["status"],
        "status_reason": ROLLOUT["statusReason"],
        "stage": ROLLOUT["stage"],
        "stage_index": ROLLOUT["stageIndex"],
        "stage_count": ROLLOUT["stageCount"],
        "waiting_for": ROLLOUT["waitingFor"],
        **PROGRESS,
    }
)
STREAM = (
    ": subscribed\n\nid: 90412\n\n"
    f"event: rollout.updated\nid: 90413\ndata: {json.dumps(ROLLOUT_UPDATED)}\n\n"
)
TEXT_EXAMPLES = {"application/x-ndjson": NDJSON, "text/event-stream": STREAM}


def _schema_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def add_examples(document: dict[str, Any]) -> list[str]:
    """Put an example on every request and response body (a body's own is kept). Returns
    where none was found (a test keeps the list empty)."""
    missing = []
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            bodies: list[tuple[str, int | None, dict[str, Any]]] = []
            for media, content in (operation.get("requestBody") or {}).get("content", {}).items():
                bodies.append((f"{where} request {media}", None, content))
            for status, response in operation.get("responses", {}).items():
                for media, content in (response.get("content") or {}).items():
                    bodies.append((f"{where} {status} {media}", int(status), content))
            for label, status, content in bodies:
                if "example" in content or "examples" in content:
                    continue
                media = label.rsplit(" ", 1)[-1]
                schema = content.get("schema", {})
                if media in TEXT_EXAMPLES:
                    content["example"] = TEXT_EXAMPLES[media]
                    continue
                variants = schema.get("oneOf") or schema.get("anyOf")
                if variants:
                    named = {n: example_for(n, status) for v in variants if (n := _schema_name(v))}
                    if named and all(e is not None for e in named.values()):
                        content["examples"] = {
                            n: {"summary": n, "value": copy.deepcopy(e)} for n, e in named.items()
                        }
                        continue
                name = _schema_name(schema)
                found = example_for(name, status) if name else None
                if found is None:
                    missing.append(label)
                    continue
                content["example"] = copy.deepcopy(found)
    return missing


def error_statuses() -> set[int]:
    """Every status an error answer may have (each has its example)."""
    return {cls.status for cls in error_classes()}
