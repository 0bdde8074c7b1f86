"""Telemetry's tests (docs/telemetry.md), and the helpers other tests borrow to post
telemetry: `event`, `heartbeat` (request items), `set_desired` (a desired state as the rollout
path gives it), `vehicle_row`, `event_count`.

- test_write_path.py: what a group writes (services/telemetry): deduplication, ordering,
  statuses, the change feed, rollout outcomes, heartbeats, refused requests.
- test_endpoints.py: the endpoints' contract: validation, ownership, size limits, overload,
  the device's desired state, the timeline.
- tests/api/test_ingest_process.py: `motorcade ingest` as processes, killed and restarted.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

URL = "/api/v1/telemetry"


def now_iso(offset: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")


def event(vid: str, seq: int, kind: str, ds: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "eventId": str(uuid.uuid4()),
        "vehicleId": vid,
        "seq": seq,
        "type": kind,
        "occurredAt": now_iso(),
        "desiredStateId": ds,
        "releaseVersion": kw.pop("release", None),
        "reasonCode": kw.pop("reason", None),
        "details": kw.pop("details", {}),
    }
    return body


def heartbeat(vid: str, **kw: Any) -> dict[str, Any]:
    return {
        "vehicleId": vid,
        "sentAt": kw.pop("sent_at", now_iso()),
        "batteryPercent": kw.pop("battery", 80),
        "stationary": kw.pop("stationary", True),
        "actualReleaseVersion": kw.pop("actual", "1.0"),
    }


def set_desired(database_url: str, vid: str, release: str = "2.0") -> str:
    """Give the vehicle a desired state (as the rollout path would) and return its id."""
    ds = str(uuid.uuid4())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO desired_states (id, vehicle_id, release_version, created_by)"
            " VALUES (%s, %s, %s, 'test')",
            (ds, vid, release),
        )
        conn.execute(
            "UPDATE vehicles SET desired_release_version = %s, desired_state_id = %s,"
            " status = 'pending', actual_release_version = '1.0' WHERE id = %s",
            (release, ds, vid),
        )
    return ds


def vehicle_row(database_url: str, vid: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as c:
        row = c.execute("SELECT * FROM vehicles WHERE id = %s", (vid,)).fetchone()
    assert row is not None
    return row


def event_count(database_url: str, prefix: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM timeline_events WHERE vehicle_id LIKE %s", (prefix + "%",)
        ).fetchone()
    assert row is not None
    return int(row[0])
