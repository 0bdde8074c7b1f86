"""idempotency keys: a fencing token per claim, and the mark of an executed request

`token` is drawn anew at every claim, a takeover of a stale key included: only the request
holding the current token may complete or release the key (UPDATE/DELETE ... WHERE token =),
so a slow original that lost its key to a retry changes nothing.

`executed_at` and `resource` are written inside the route's own transaction (core/db.py,
`idempotency_guard`): a key whose work committed is never taken over by a retry, even if its
process died before it stored the response; the retry answers from `resource` (what the
request created, re-read) or 409 IDEMPOTENCY_KEY_IN_USE. Existing rows get a random token
and no execution mark: the volatile default (`gen_random_uuid()`) rewrites the table under an
exclusive lock, which is brief because the table holds only the last 24 h of keys.

Revision ID: 0015
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "idempotency_keys",
        sa.Column(
            "token",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
    )
    op.add_column(
        "idempotency_keys", sa.Column("executed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("idempotency_keys", sa.Column("resource", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("idempotency_keys", "resource")
    op.drop_column("idempotency_keys", "executed_at")
    op.drop_column("idempotency_keys", "token")
