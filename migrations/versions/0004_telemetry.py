"""telemetry: the narrow per-vehicle telemetry row written by every heartbeat and event

`vehicle_telemetry` holds what heartbeats refresh (last seen, battery, stationary, actual
release) and the ordering state of events (latest seq, type, desired state, reason). It has
no secondary index and fillfactor 70, so the once-a-minute heartbeat update of a million
vehicles is a HOT update of one narrow row; the wide `vehicles` row (eleven indexes) is only
rewritten when something visible changes (see docs/data-model.md).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vehicle_telemetry",
        sa.Column("vehicle_id", sa.Text(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("battery_percent", sa.SmallInteger(), nullable=True),
        sa.Column("stationary", sa.Boolean(), nullable=True),
        sa.Column("actual_release_version", sa.Text(), nullable=True),
        sa.Column("last_event_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_event_type", sa.Text(), nullable=True),
        sa.Column("last_event_desired_state_id", postgresql.UUID(), nullable=True),
        sa.Column("last_event_release_version", sa.Text(), nullable=True),
        sa.Column("last_event_reason_code", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("vehicle_id"),
        postgresql_with={"fillfactor": "70"},
    )


def downgrade() -> None:
    op.drop_table("vehicle_telemetry")
