"""What every field of the API's schemas means, for `docs/openapi.yaml` (and so for `/docs`
and generated clients): a description wherever a model's `Field(description=...)` left none.

A field keeps the meaning its name gives it across the API (`releaseVersion`, `vehicleId`,
`createdAt`), so most descriptions are written once per name (`BY_NAME`); where one name
means different things, the schema's own entry wins (`BY_SCHEMA`, by plain schema name).
`tests/api/test_openapi_docs.py` fails on a field left without a description.
"""

from __future__ import annotations

from typing import Any

ENVELOPE = {
    "data": "The resource (or, in a page, the items).",
    "metadata": "About this answer: `requestId` (and, in a page, the cursor to the next).",
    "timestamp": "When the server answered (UTC, ending in `Z`).",
}

BY_NAME: dict[str, str] = {
    **ENVELOPE,
    "requestId": "The request's id (`X-Request-ID`, echoed; generated when not sent): quote "
    "it when reporting a problem.",
    "limit": "The page size used.",
    "nextCursor": "Pass as `cursor` for the next page; null on the last page.",
    "hasMore": "True when another page follows.",
    "releaseVersion": "A release's version, as registered (`POST /releases`).",
    "vehicleId": "The vehicle's id.",
    "desiredStateId": "The desired state's id (a UUID): what the vehicle reports back against.",
    "rolloutId": "The rollout it belongs to; null for a desired state written directly.",
    "createdAt": "When it was created (UTC).",
    "createdBy": "Who created it: the token's subject.",
    "updatedAt": "When it last changed (UTC).",
    "startedAt": "When it started (UTC); null before.",
    "finishedAt": "When it finished (UTC); null while it runs.",
    "model": "The vehicle model.",
    "region": "The vehicle's region.",
    "ring": "The vehicle's deployment ring (e.g. `canary`, `early`, `broad`).",
    "org": "The organisation the vehicle belongs to.",
    "reasonCodes": "Why the vehicle is in its status (UPPER_SNAKE codes, e.g. `BATTERY_LOW`, "
    "`INSTALL_FAILED`); empty when nothing is wrong.",
    "reasonCode": "A reason code (UPPER_SNAKE, e.g. `INSTALL_FAILED`); null when none.",
    "components": "The software components of the release, each a name and a version.",
    "artifactDigest": "The digest of the release's artifact (`sha256:` and 64 hex digits).",
    "signature": "The release's ed25519 signature (base64) over its version, digest and "
    "components.",
    "signingKeyId": "The id of the trusted key that signed the release.",
    "notes": "Free text about the release.",
    "bakeSeconds": "How long the stage waits after all its vehicles have settled, before it "
    "is judged.",
    "percent": "A share of the targeted vehicles, in percent.",
    "targets": "Which vehicles: those matching every list given (at least one; an absent "
    "list matches all), inside the caller's scope.",
    "strategy": "The stages: a canary, then waves.",
    "gates": "What each stage is judged on.",
    "timeouts": "How long a vehicle may take.",
    "retry": "How a vehicle whose update failed is retried.",
    "safetyChecks": "The checks a vehicle must pass before it is updated.",
    "acknowledgeWeakenedSafety": "Must be true to accept safety settings weaker than the "
    "defaults (audited); otherwise such a request is 422 `SAFETY_POLICY_WEAKENED`.",
    "requireStationary": "Update only a vehicle that reports itself stationary.",
    "minBatteryPercent": "Update only a vehicle whose battery is at least this full.",
    "maintenanceWindow": "When vehicles may be updated (null: at any time).",
    "stage": "The stage's name: `canary`, `wave-1`, `wave-2`, ...",
    "stageIndex": "The stage's position, from 0.",
    "stageCount": "How many stages the rollout has (0 before its targets are expanded).",
    "statusReason": "Why the rollout is in its status (a code such as `OPERATOR`, "
    "`CANARY_UNHEALTHY`, `FAILURE_THRESHOLD`); null when nothing needs saying.",
    "waitingFor": "The step the rollout waits on now, for a person (e.g. `bake of canary "
    "until 12:10`, `resume`); null when it waits on nothing.",
    "progress": "The rollout's counters: vehicles by state inside it.",
    "targeted": "Vehicles the rollout targets.",
    "notified": "Vehicles sent the desired state so far, held back ones included "
    "(cumulative: the other counters say where they are now).",
    "updating": "Vehicles downloading or installing now.",
    "succeeded": "Vehicles that reported the release installed and running.",
    "failed": "Vehicles whose update failed now (a retry moves one back).",
    "blocked": "Vehicles held back by a safety check now.",
    "pending": "Targeted vehicles not yet sent the desired state (`targeted - notified`).",
    "total": "How many vehicles.",
    "byStatus": "Vehicles by status (`in_sync`, `pending`, `updating`, `blocked`, `failed`, "
    "`offline`).",
    "topReasonCodes": "The most frequent reason codes, most vehicles first.",
    "offline": "Vehicles whose last report is older than MOTORCADE_OFFLINE_AFTER_SECONDS.",
    "batteryPercent": "The battery's charge, 0 to 100; null when never reported.",
    "stationary": "Whether the vehicle reported itself stationary; null when never reported.",
    "actualReleaseVersion": "The release the vehicle reports running.",
    "occurredAt": "When it happened, by the vehicle's clock (UTC).",
    "sentAt": "When the vehicle sent it, by its clock (UTC).",
    "details": "More about it, as the sender gave it (a JSON object).",
    "correlationId": "Ties the entries of one request or workflow action together (the "
    "request's `X-Request-ID`).",
    "actor": "Who did it: a token's subject (through the API), the `actor` a Temporal signal "
    "named (default `temporal`), `workflow` (the rollout's own decisions) or the name of "
    "another system job.",
    "role": "The actor's role when it acted.",
    "targetType": "What kind of thing it acted on: `rollout`, `release`, `desired_state`, "
    "`vehicle`, ...",
    "targetId": "The id of the thing it acted on.",
    "payload": "What was asked or decided, as JSON (secrets redacted).",
    "result": "How it ended: `ok`, `rejected`, `failed`, ...",
    "at": "When it happened (UTC).",
    "workflowId": "The rollout's Temporal workflow id (`rollout-{id}`).",
    "temporalUiUrl": "The rollout's workflow in the Temporal Web UI.",
    "desired": "The release the vehicle should run, and the rollout or desired state that "
    "asked for it.",
    "actual": "The release the vehicle reports running.",
    "lastSeenAt": "When the vehicle last reported (UTC); null when never.",
    "weakenedSafety": "The safety settings weaker than the defaults (each needs "
    "`acknowledgeWeakenedSafety`).",
    "problems": "Why creating it now would be refused, or what to look at (e.g. `CONFLICT`, "
    "`NO_VEHICLES`).",
    "overlap": "Vehicles that another active rollout already targets.",
    "sampleVehicleIds": "Up to 10 of them.",
    "rolloutIds": "The other rollouts.",
    "batteryLow": "Vehicles below the minimum battery now.",
    "notStationary": "Vehicles reporting themselves moving now.",
    "unknown": "Vehicles with no battery or motion report yet.",
    "models": "Vehicle models to include.",
    "regions": "Regions to include.",
    "rings": "Rings to include.",
    "orgs": "Organisations to include.",
    "vehicleIds": "Vehicle ids to include (at most 10,000).",
    "canary": "The first stage: a few vehicles, judged before any wave.",
    "waves": "The stages after the canary, each ending at a cumulative share of the targets "
    "(the last ends at 100 %).",
    "canaryHealthy": "The canary passes when enough of its vehicles succeeded.",
    "failureThreshold": "What happens when too many vehicles fail.",
    "minSuccessRate": "The share of the canary's settled vehicles that must have succeeded "
    "(0 to 1).",
    "minSamples": "How many of the canary's vehicles must have settled before it is judged.",
    "maxFailureRate": "The share of the vehicles sent the update so far (still installing "
    "ones included) that may have failed (0 to 1) before `action`.",
    "applySeconds": "How long a notified vehicle may take to report success or failure "
    "before it counts as failed (`APPLY_TIMEOUT`).",
    "maxAttempts": "Attempts per vehicle, the first included.",
    "backoffSeconds": "The wait before the first retry; it doubles with each retry.",
    "start": "The window's start, `HH:MM` in `timezone`.",
    "end": "The window's end, `HH:MM` in `timezone` (before `start`: it spans midnight).",
    "timezone": "An IANA time zone (e.g. `Europe/Berlin`).",
    "days": "The weekdays it opens (`mon` ... `sun`; default every day; an empty list never "
    "opens).",
    "attempt": "Which attempt at this vehicle it is, from 1 (0: not yet sent).",
    "notifiedAt": "When the vehicle was last sent the desired state (UTC).",
    "vehicleStatus": "The vehicle's own status in the fleet.",
    "eventId": "The event's id, chosen by the vehicle: a retried event with the same id is "
    "stored once.",
    "seq": "The event's number in the vehicle's sequence (per `epoch`): orders events.",
    "epoch": "The generation of the vehicle's sequence counter.",
    "receivedAt": "When the server received it (UTC).",
    "previousDesiredStateId": "The desired state it replaced (a rollback restores it).",
    "heartbeats": "Heartbeats: battery, motion and running release, coalesced per vehicle.",
    "events": "Vehicle events (progress, success, failure), each stored once.",
    "runKey": "The reconcile run's key (one per Schedule firing).",
    "markedOffline": "Vehicles the run marked offline.",
    "drifted": "Vehicles whose running release differs from their desired one.",
    "latest": "The last finished reconcile run; null before the first.",
    "drift": "Drifted vehicles grouped by desired and running release and place.",
    "driftTruncated": "True when `drift` holds only the largest groups.",
    "recentRuns": "The last reconcile runs, newest first.",
    "desiredReleaseVersion": "The release the vehicles should run.",
    "asOf": "When the counts were computed (the last reconcile run's refresh); null before "
    "the first.",
    "byModel": "Counts by vehicle model, each with its statuses.",
    "byRegion": "Counts by region, each with its statuses.",
    "byRing": "Counts by ring, each with its statuses.",
    "checks": "Each dependency's answer.",
    "rollout": "The rollout as it is now.",
    "control": "What the workflow did with the action.",
    "paused": "Whether the rollout is paused after the action.",
    "count": "How many desired states were written.",
    "safety": "How many targeted vehicles the safety checks would block right now.",
    "error": "What went wrong.",
    "field": "The field at fault (a dotted path into the body, a query or header name); "
    "null when not one field.",
    "counts": "Deprecated: the same as `progress` (its name before 1.6.0).",
    "refreshedAt": "When the counts were refreshed (UTC).",
    "seconds": "How long the refresh took.",
    "runId": "The reconcile run that refreshed them.",
    "size": "How many vehicles (instead of `percent`).",
    "type": "What happened: one of the event types.",
    "version": "The version.",
}

BY_SCHEMA: dict[tuple[str, str], str] = {
    ("AuditEntry", "id"): "The entry's id, increasing: the order entries were written in.",
    ("AuditEntry", "action"): "What was done, `noun.verb` (e.g. `rollout.pause_requested`).",
    ("AuditEntry", "reason"): "The reason its actor gave.",
    ("DesiredState", "id"): "The desired state's id (a UUID).",
    ("RolloutVehicle", "state"): "The vehicle's state inside this rollout: `planned`, "
    "`notified`, `updating`, `succeeded`, `failed`, `blocked`, `rolled_back` or `skipped`.",
    ("DesiredState", "reason"): "The reason its writer gave.",
    ("DesiredStateCreate", "reason"): "Why (audited).",
    ("DesiredStateCreate", "targets"): "The vehicles to write it for (at least one list).",
    ("RolloutCreate", "reason"): "Why (audited).",
    ("ReconcileRun", "id"): "The run's id.",
    ("Rollout", "id"): "The rollout's id.",
    ("Rollout", "status"): "Where the rollout is in its life.",
    ("Rollout", "name"): "A name for people; null when none was given.",
    ("RolloutCreate", "name"): "A name for people (optional).",
    ("RolloutUpdatedEvent", "id"): "The rollout's id.",
    ("RolloutUpdatedEvent", "status"): "Where the rollout is in its life.",
    ("Vehicle", "id"): "The vehicle's id, unique in the fleet.",
    ("Vehicle", "status"): "The vehicle's status, derived from what it reports "
    "(docs/vehicle_status.md).",
    ("Vehicle", "metadata"): "Free-form attributes given at registration.",
    ("VehicleCreate", "id"): "The vehicle's id, unique in the fleet (1 to 128 characters).",
    ("VehicleCreate", "metadata"): "Free-form attributes (a JSON object).",
    ("VehicleCreate", "org"): "The organisation it belongs to (default `default`).",
    ("VehicleDelta", "id"): "The vehicle's id.",
    ("VehicleDelta", "status"): "The vehicle's status now.",
    ("DriftRow", "status"): "The vehicles' status.",
    ("DriftRow", "vehicles"): "How many vehicles are in this group.",
    ("ControlOutcome", "action"): "The action taken: `pause`, `resume`, `rollback` or `abort`.",
    ("ControlOutcome", "status"): "The rollout's status after it.",
    ("FailureThresholdGate", "action"): "What to do when the threshold is crossed: `pause` "
    "the rollout or `rollback` it.",
    ("PlannedStage", "index"): "The stage's position, from 0.",
    ("PlannedStage", "name"): "The stage's name: `canary`, `wave-1`, ...",
    ("PlannedStage", "vehicles"): "How many vehicles the stage holds.",
    ("ReasonCodeCount", "vehicles"): "How many vehicles report it.",
    ("ReasonCodeCount", "reasonCode"): "The reason code (UPPER_SNAKE).",
    ("VehicleBatchCreate", "vehicles"): "The vehicles to register (1 to 500).",
    ("VehicleUpdatedEvent", "vehicles"): "What changed, up to 500 vehicles per event.",
    ("ReleaseComponent", "name"): "The component's name (e.g. `infotainment`).",
    ("ReleaseComponentCreate", "name"): "The component's name (e.g. `infotainment`).",
    ("ReleaseComponent", "version"): "The component's version.",
    ("ReleaseComponentCreate", "version"): "The component's version.",
    ("ReleaseCreate", "version"): "The release's version, unique (e.g. `2026.11.0`).",
    ("Release", "version"): "The release's version.",
    ("ErrorBody", "message"): "What went wrong, for a person.",
    ("ErrorBody", "details"): "One entry per problem (a field and what is wrong with it); "
    "may be empty.",
    ("ErrorDetail", "message"): "What is wrong with it.",
    ("ErrorDetail", "index"): "For a batch, the position of the item at fault (from 0).",
    ("ErrorDetail", "code"): "A code for this problem, when it has its own.",
    ("TimelineEvent", "type"): "What happened: a vehicle event's type, or a server-side "
    "entry (e.g. `desired_state.issued`).",
    ("TelemetryEvent", "type"): "What happened.",
    ("PlaceCounts", "total"): "Vehicles in this place.",
    ("PlaceCounts", "byStatus"): "Its vehicles by status.",
    ("FleetSummary", "total"): "Vehicles in the caller's scope.",
    ("HealthReport", "total"): "Vehicles in the caller's scope.",
    ("FleetSummaryEvent", "reason"): "Why: `refreshed` (a reconcile run refreshed the counts).",
    ("ResyncEvent", "reason"): "`SLOW_SUBSCRIBER` (the stream ends) or `EVENTS_EXPIRED` (the "
    "stream goes on with live events).",
    ("RolloutPlan", "stages"): "The stages as they would be now.",
    ("IssuedDesiredState", "desiredStateId"): "The desired state written for it.",
}


# Query, path and header parameters, by name. A filter given several values (repeated, or
# comma-separated) matches any of them.
PARAMETERS: dict[str, str] = {
    "model": "Only vehicles of these models.",
    "region": "Only vehicles in these regions.",
    "ring": "Only vehicles in these rings.",
    "status": "Only these statuses.",
    "reasonCode": "Only vehicles reporting one of these reason codes.",
    "releaseVersion": "Only those of these releases.",
    "rolloutId": "Only those of these rollouts.",
    "vehicleId": "Only those of these vehicles.",
    "targetType": "Only entries about this kind of thing (`rollout`, `release`, ...).",
    "targetId": "Only entries about these ids.",
    "vehicle_id": "The vehicle's id.",
    "version": "The release's version.",
    "rollout_id": "The rollout's id.",
    "if-none-match": "The `ETag` of the desired state the device already has: `304` with "
    "no body while it is unchanged.",
    "Last-Event-ID": "The id of the last event received (an `EventSource` sends it when it "
    "reconnects): the stream resumes after it.",
}


def describe_parameters(document: dict[str, Any]) -> list[str]:
    """Give every operation's parameters a description (a route's own is kept). Returns
    `operationId.parameter` for those that found none."""
    missing = []
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("description") or parameter.get("schema", {}).get("description"):
                    continue
                text = PARAMETERS.get(parameter["name"])
                if text is None:
                    missing.append(f"{operation.get('operationId')}.{parameter['name']}")
                    continue
                parameter["description"] = text
    return missing


def describe_fields(document: dict[str, Any]) -> list[str]:
    """Give every property of every schema its description (a model's own is kept). Returns
    the `Schema.field` names that found none (a test keeps the list empty)."""
    missing = []
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        for field, spec in (schema.get("properties") or {}).items():
            if "description" in spec:
                continue
            text = BY_SCHEMA.get((name, field)) or BY_NAME.get(field)
            if text is None:
                missing.append(f"{name}.{field}")
                continue
            spec["description"] = text
    return missing
