"""fleet counts: a materialization of vehicles by place and status, for GET /fleet/summary

`fleet_counts` holds the number of vehicles per (model, region, ring, org, status) and
`fleet_reason_counts` per (model, region, ring, org, reason code), with `fleet_counts_meta`
saying when they were computed. The reconcile run refreshes them (one scan of `vehicles`
every MOTORCADE_RECONCILE_INTERVAL_SECONDS), so a summary request reads a few hundred rows,
never the fleet, and no writer of `vehicles` pays for them (an index on `vehicles.status`
would make every issue and every status change a non-HOT update: migration 0003).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PLACE = ("model", "region", "ring", "org")


def upgrade() -> None:
    op.create_table(
        "fleet_counts",
        *(sa.Column(c, sa.Text(), nullable=False) for c in PLACE),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("vehicles", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(*PLACE, "status"),
    )
    op.create_table(
        "fleet_reason_counts",
        *(sa.Column(c, sa.Text(), nullable=False) for c in PLACE),
        sa.Column("reason_code", sa.Text(), nullable=False),
        sa.Column("vehicles", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(*PLACE, "reason_code"),
    )
    op.create_table(
        "fleet_counts_meta",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("id = 1", name="ck_fleet_counts_meta_one_row"),
    )


def downgrade() -> None:
    op.drop_table("fleet_counts_meta")
    op.drop_table("fleet_reason_counts")
    op.drop_table("fleet_counts")
