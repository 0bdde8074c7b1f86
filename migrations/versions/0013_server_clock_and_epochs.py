"""telemetry clocks and counters: liveness by the server's clock, events ordered by (epoch, seq)

Device clocks no longer decide liveness (docs/telemetry.md, "Clocks and counters"):
`last_seen_at` is the server's receive time, and the values of a heartbeat are ordered by
`vehicle_telemetry.heartbeat_at`, its `sentAt` capped at its arrival. Rows heard from before
this migration get their `last_seen_at` as `heartbeat_at` (it was the greatest `sentAt`).
A `last_seen_at` in the future (a device dated 2099 froze its vehicle online) is brought back
to the migration's time, in both tables, so such a vehicle can go offline again.

Events carry the device's `epoch` (the generation of its `seq` counter, 0 for every event
stored before): a vehicle's newest event is the greatest `(epoch, seq)`
(`vehicles.last_event_epoch`), and a timeline is ordered and paginated by it, hence the
index on `(vehicle_id, epoch, seq)` in place of `(vehicle_id, seq)`. The new columns are
`NOT NULL DEFAULT 0` (a catalog-only change); the index is rebuilt on every partition.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "vehicle_telemetry", sa.Column("heartbeat_at", sa.TIMESTAMP(timezone=True), nullable=True)
    )
    op.execute("UPDATE vehicle_telemetry SET last_seen_at = now() WHERE last_seen_at > now()")
    op.execute("UPDATE vehicle_telemetry SET heartbeat_at = last_seen_at")
    op.execute("UPDATE vehicles SET last_seen_at = now() WHERE last_seen_at > now()")
    op.add_column(
        "vehicles",
        sa.Column("last_event_epoch", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "timeline_events",
        sa.Column("epoch", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.drop_index("ix_timeline_vehicle_seq", table_name="timeline_events")
    op.create_index(
        "ix_timeline_vehicle_epoch_seq", "timeline_events", ["vehicle_id", "epoch", "seq"]
    )


def downgrade() -> None:
    op.drop_index("ix_timeline_vehicle_epoch_seq", table_name="timeline_events")
    op.create_index("ix_timeline_vehicle_seq", "timeline_events", ["vehicle_id", "seq"])
    op.drop_column("timeline_events", "epoch")
    op.drop_column("vehicles", "last_event_epoch")
    op.drop_column("vehicle_telemetry", "heartbeat_at")
