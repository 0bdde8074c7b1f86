"""reconcile: runs of the periodic reconcile workflow and the drift each one recorded

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reconcile_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column("run_key", sa.Text(), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("marked_offline", sa.Integer(), server_default="0", nullable=False),
        sa.Column("drifted", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "summary",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_key", name="uq_reconcile_runs_run_key"),
    )
    op.create_index("ix_reconcile_runs_started", "reconcile_runs", ["started_at", "id"])
    op.create_table(
        "reconcile_drift",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("desired_release_version", sa.Text(), nullable=False),
        sa.Column("actual_release_version", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("org", sa.Text(), nullable=False),
        sa.Column("vehicles", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(
            "run_id",
            "desired_release_version",
            "actual_release_version",
            "status",
            "region",
            "model",
            "org",
        ),
    )


def downgrade() -> None:
    op.drop_table("reconcile_drift")
    op.drop_index("ix_reconcile_runs_started", table_name="reconcile_runs")
    op.drop_table("reconcile_runs")
