"""Report schemas: `GET /api/v1/reports/reconcile`, `GET /api/v1/reports/health` and
`GET /api/v1/fleet/summary` (camelCase on the wire)."""

from __future__ import annotations

from datetime import datetime

from models.api import CamelModel


class ReconcileRunOut(CamelModel):
    id: int
    run_key: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # Fleet-wide; null for a scoped caller (the offline marking is not recorded per place).
    marked_offline: int | None = None
    # Vehicles whose desired release differs from the actual one, inside the caller's scope.
    drifted: int


class DriftRowOut(CamelModel):
    desired_release_version: str | None
    actual_release_version: str | None
    status: str
    region: str
    model: str
    org: str
    vehicles: int


class ReconcileReport(CamelModel):
    latest: ReconcileRunOut | None
    drift: list[DriftRowOut]
    drift_truncated: bool = False
    recent_runs: list[ReconcileRunOut]


class ReasonCodeCount(CamelModel):
    reason_code: str
    vehicles: int


class HealthReport(CamelModel):
    total: int
    by_status: dict[str, int]
    offline: int
    top_reason_codes: list[ReasonCodeCount]


class PlaceCounts(CamelModel):
    total: int
    by_status: dict[str, int]


class FleetSummary(CamelModel):
    """`GET /fleet/summary`: counts inside the caller's scope as of `asOf` (the materialization
    each reconcile run refreshes; null before the first run)."""

    as_of: datetime | None = None
    total: int
    by_status: dict[str, int]
    by_model: dict[str, PlaceCounts]
    by_region: dict[str, PlaceCounts]
    by_ring: dict[str, PlaceCounts]
    top_reason_codes: list[ReasonCodeCount]
