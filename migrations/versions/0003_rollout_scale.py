"""rollout scale: issuing a stage is a HOT update; desired states shared by a target set

Issuing a million vehicles' desired states must not rewrite every index of `vehicles` and
`rollout_targets`: an UPDATE that changes no indexed column and finds room on its page is a
heap-only (HOT) update, which writes no index entry at all.

- `vehicles`: the columns a rollout changes on issue (`status`, `desired_release_version`,
  `rollout_id`) lose their indexes; the `rolloutId` filter of the fleet list is served by
  `rollout_targets`' primary key instead. Fillfactor 70 leaves room on each page.
- `rollout_targets`: one index, `(rollout_id, stage, vehicle_id)`, instead of three that
  included `state` (the state moves on issue); fillfactor 70.
- `desired_states.vehicle_id` is nullable: a rollout writes one desired state per target set
  (a stage, a retry attempt, a rollback to one release) that every vehicle of the set points
  to, as SPEC.md allows ("desired state per vehicle or target set").

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_vehicles_status_id", table_name="vehicles")
    op.drop_index("ix_vehicles_desired_release_id", table_name="vehicles")
    op.drop_index("ix_vehicles_rollout_id", table_name="vehicles")
    op.execute("ALTER TABLE vehicles SET (fillfactor = 70)")

    op.drop_index("ix_rollout_targets_stage_state", table_name="rollout_targets")
    op.drop_index("ix_rollout_targets_state", table_name="rollout_targets")
    op.drop_index("ix_rollout_targets_vehicle", table_name="rollout_targets")
    op.create_index(
        "ix_rollout_targets_stage", "rollout_targets", ["rollout_id", "stage", "vehicle_id"]
    )
    op.execute("ALTER TABLE rollout_targets SET (fillfactor = 70)")

    op.alter_column("desired_states", "vehicle_id", nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM desired_states WHERE vehicle_id IS NULL")
    op.alter_column("desired_states", "vehicle_id", nullable=False)

    op.execute("ALTER TABLE rollout_targets RESET (fillfactor)")
    op.drop_index("ix_rollout_targets_stage", table_name="rollout_targets")
    op.create_index("ix_rollout_targets_vehicle", "rollout_targets", ["vehicle_id"])
    op.create_index(
        "ix_rollout_targets_state", "rollout_targets", ["rollout_id", "state", "vehicle_id"]
    )
    op.create_index(
        "ix_rollout_targets_stage_state",
        "rollout_targets",
        ["rollout_id", "stage", "state", "vehicle_id"],
    )

    op.execute("ALTER TABLE vehicles RESET (fillfactor)")
    op.create_index("ix_vehicles_rollout_id", "vehicles", ["rollout_id", "id"])
    op.create_index("ix_vehicles_desired_release_id", "vehicles", ["desired_release_version", "id"])
    op.create_index("ix_vehicles_status_id", "vehicles", ["status", "id"])
