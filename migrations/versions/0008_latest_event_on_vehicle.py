"""telemetry: the latest event lives on the `vehicles` row; `vehicle_telemetry` keeps heartbeats

Every event that becomes its vehicle's latest rewrites the wide `vehicles` row anyway (its
status, reason codes, `last_event_seq`). Keeping the rest of the latest event there too (type,
desired state, release, reason code: unindexed columns, so still a heap-only update) means an
event no longer also upserts the narrow `vehicle_telemetry` row, which now holds only what
heartbeats refresh. One write fewer per event at fleet rate (docs/data-model.md).

The four new columns are nullable without a default (a catalog-only change); the values of
vehicles already heard from are copied over before the narrow columns are dropped.

`vehicle_telemetry` goes from fillfactor 70 to 50: a heartbeat is a heap-only update only
when the new row version fits on its page, and a group of heartbeats can update every row
of a page in one transaction (ids that arrive together are often neighbours, and neighbours
were created together), whose old versions cannot be pruned before it commits. Half a page
free is room for all of them. The table is narrow (about 60 bytes a row): 60 MB more at a
million vehicles. Pages written before this keep their old density until rewritten.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_COLUMNS = (
    ("last_event_type", sa.Text()),
    ("last_event_desired_state_id", postgresql.UUID()),
    ("last_event_release_version", sa.Text()),
    ("last_event_reason_code", sa.Text()),
)
_NAMES = ", ".join(name for name, _ in _EVENT_COLUMNS)
_FROM_T = ", ".join(f"t.{name}" for name, _ in _EVENT_COLUMNS)
_FROM_V = ", ".join(f"v.{name}" for name, _ in _EVENT_COLUMNS)


def upgrade() -> None:
    for name, type_ in _EVENT_COLUMNS:
        op.add_column("vehicles", sa.Column(name, type_, nullable=True))
    op.execute(
        f"""
        UPDATE vehicles v
        SET last_event_seq = t.last_event_seq, ({_NAMES}) = ROW({_FROM_T})
        FROM vehicle_telemetry t
        WHERE t.vehicle_id = v.id AND t.last_event_seq > 0
        """
    )
    op.drop_column("vehicle_telemetry", "last_event_seq")
    for name, _ in _EVENT_COLUMNS:
        op.drop_column("vehicle_telemetry", name)
    op.execute("ALTER TABLE vehicle_telemetry SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute("ALTER TABLE vehicle_telemetry SET (fillfactor = 70)")
    op.add_column(
        "vehicle_telemetry",
        sa.Column("last_event_seq", sa.BigInteger(), server_default="0", nullable=False),
    )
    for name, type_ in _EVENT_COLUMNS:
        op.add_column("vehicle_telemetry", sa.Column(name, type_, nullable=True))
    op.execute(
        f"""
        UPDATE vehicle_telemetry t
        SET last_event_seq = v.last_event_seq, ({_NAMES}) = ROW({_FROM_V})
        FROM vehicles v
        WHERE t.vehicle_id = v.id AND v.last_event_seq > 0
        """
    )
    for name, _ in _EVENT_COLUMNS:
        op.drop_column("vehicles", name)
