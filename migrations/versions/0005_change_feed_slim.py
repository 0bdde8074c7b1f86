"""change feed: the primary key and a BRIN on created_at, no other index

Telemetry writes a change-feed row for every status change, from several group-commit
writers at once. Each B-tree on `change_feed` is an insert at its right-hand edge (ids and
times only grow), so every writer fought over the same last leaf pages of three indexes. A
reader follows ids (backfill after `Last-Event-ID` is a range of the primary key; the topic is
checked on those rows), and retention deletes by time, which a BRIN index serves at almost no
cost per insert. Measured with bench/ingest.py (200k vehicles, 2 cores): status-changing
events 17-20k/s with the three B-trees, about 22k/s without (bench/RESULTS.md).

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_change_feed_topic_id", table_name="change_feed")
    op.drop_index("ix_change_feed_created", table_name="change_feed")
    op.create_index(
        "ix_change_feed_created", "change_feed", ["created_at"], postgresql_using="brin"
    )


def downgrade() -> None:
    op.drop_index("ix_change_feed_created", table_name="change_feed")
    op.create_index("ix_change_feed_created", "change_feed", ["created_at"])
    op.create_index("ix_change_feed_topic_id", "change_feed", ["topic", "id"])
