"""change feed writers take a shared advisory lock; timeline events findable by age

The stream hub (services/stream.py) delivers the change feed up to its first hole (an id not
visible yet) and waits for the transaction that may own it. It used to wait for every
transaction in progress when the hole was seen (`pg_snapshot_xmin`), so one unrelated
transaction left open anywhere (`BEGIN; UPDATE ...;` in a psql session) froze every live
stream. Now the statement-level `BEFORE INSERT` trigger on `change_feed` (migration 0009) also
takes `pg_advisory_xact_lock_shared(28003, 26211)` (the feed writers' lock) before the
statement draws any feed id: the owner of a hole is one of the transactions holding that lock,
and the hub waits only for those (pg_locks). Shared locks never conflict with one another, and
nothing takes this lock exclusively: a writer never waits for it.

`timeline_events.received_at` (the server's clock) gets a B-tree, created on each of the 16
hash partitions: the retention purge (activities/retention.py) finds a partition's events
past retention oldest first, in batches, without reading the partition. A B-tree rather than
a BRIN: deleted space is reused by new rows, which widens a BRIN's ranges until every range
matches an old time and each purge reads the whole partition.

The index is built per partition with `CREATE INDEX CONCURRENTLY` outside the migration's
transaction (docs/migrations.md: a plain build would block telemetry inserts for as long as
it runs, and ingest would answer 503 at its lock timeout), then created on the parent, which
attaches the partitions' indexes without building anything.

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# services/stream.py FEED_LOCK: (classid, objid) of the two-key advisory lock.
FEED_LOCK = (28003, 26211)
# migration 0001: timeline_events is hash-partitioned in 16, timeline_events_p00 ... p15.
TIMELINE_PARTITIONS = 16


def upgrade() -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION change_feed_take_xid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_current_xact_id();
            PERFORM pg_advisory_xact_lock_shared({FEED_LOCK[0]}, {FEED_LOCK[1]});
            RETURN NULL;
        END $$
        """
    )
    with op.get_context().autocommit_block():
        for remainder in range(TIMELINE_PARTITIONS):
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_timeline_received_p{remainder:02d}"
                f" ON timeline_events_p{remainder:02d} (received_at)"
            )
    # On the parent: attaches the partitions' indexes (same definition), builds nothing.
    op.execute("CREATE INDEX IF NOT EXISTS ix_timeline_received ON timeline_events (received_at)")


def downgrade() -> None:
    op.drop_index("ix_timeline_received", table_name="timeline_events")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION change_feed_take_xid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_current_xact_id();
            RETURN NULL;
        END $$
        """
    )
