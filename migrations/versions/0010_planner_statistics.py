"""planner statistics: none for the columns no query filters, sorts or joins on

Autovacuum analyzes each timeline partition after every 10% of growth and `vehicles` after
every 10% of its rows has changed: at fleet rate that is continuous work (bench/ingest.py
profiled with perf: ANALYZE was 15% of PostgreSQL's CPU while ingesting, a quarter of it
comparing `jsonb` values to build histograms nobody reads). The planner only ever sees
`timeline_events` by `vehicle_id`, `seq` and `event_id` (the timeline keyset, the primary
key), and never filters `vehicles.metadata`. Statistics target 0 makes ANALYZE skip a column;
the columns queries use keep the default target.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Read by no filter, sort or join (services/vehicles.py timeline_query, services/telemetry/).
UNPLANNED = {
    "timeline_events": (
        "type",
        "occurred_at",
        "received_at",
        "desired_state_id",
        "release_version",
        "reason_code",
        "details",
    ),
    "vehicles": ("metadata",),
}


def _set(target: int) -> None:
    for table, columns in UNPLANNED.items():
        clauses = ", ".join(f"ALTER COLUMN {c} SET STATISTICS {target}" for c in columns)
        op.execute(f"ALTER TABLE {table} {clauses}")  # a partitioned table: every partition


def upgrade() -> None:
    _set(0)


def downgrade() -> None:
    _set(-1)
