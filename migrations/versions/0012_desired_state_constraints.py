"""desired state constraints: the safety checks a vehicle applies again at apply time

A desired state carries the checks it was issued under (`constraints`: `minBatteryPercent`,
`requireStationary`, `maintenanceWindow`), so the vehicle that reads it can check them again
before it applies (docs/safety.md). Nullable: a direct desired state written before this
migration recorded its checks only in its audit entry. A rollout's target-set desired states
written before it get their rollout's stored `gates.safetyChecks` (the API stores the
effective checks; a missing one takes the fleet default of the time: 30 %, stationary).

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("desired_states", sa.Column("constraints", postgresql.JSONB(), nullable=True))
    op.execute(
        """
        UPDATE desired_states ds
        SET constraints = jsonb_build_object(
            'minBatteryPercent',
            coalesce((r.gates -> 'safetyChecks' ->> 'minBatteryPercent')::integer, 30),
            'requireStationary',
            coalesce((r.gates -> 'safetyChecks' ->> 'requireStationary')::boolean, true),
            'maintenanceWindow',
            coalesce(r.gates -> 'safetyChecks' -> 'maintenanceWindow', 'null'::jsonb))
        FROM rollouts r
        WHERE ds.rollout_id = r.id AND ds.vehicle_id IS NULL
        """
    )


def downgrade() -> None:
    op.drop_column("desired_states", "constraints")
