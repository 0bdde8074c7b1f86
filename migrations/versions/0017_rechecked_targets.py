"""rollout targets: `rechecked`, notified again by the blocked re-check; its counter

A target held back or reported `blocked` is judged again while its rollout runs
(services/rollouts/sweeps.py, `recheck_blocked`); when its vehicle passes, the target is
`notified` again. Until now the stage's settle counted it as in flight: in a fleet whose
vehicles move, some always were (blocked, re-notified, blocked again before applying), and a
stage never settled. `rechecked` marks such a target so the settle does not wait for it,
applying or not (workflows/policy.py, `unsettled`); the retry sweep and the first issue leave
it false. `rollouts.rechecked` counts the targets `notified` or `updating` with it, moved
by the statements that move targets (services/rollouts/counters.py), so the gates' quick look
(from the counters, never a scan) leaves them out too.

A boolean with a constant default: PostgreSQL adds it without rewriting the table, and an
update that sets it stays HOT (no index includes it).

Revision ID: 0017
Revises: 0016
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "rollout_targets",
        sa.Column("rechecked", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "rollouts",
        sa.Column("rechecked", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("rollouts", "rechecked")
    op.drop_column("rollout_targets", "rechecked")
