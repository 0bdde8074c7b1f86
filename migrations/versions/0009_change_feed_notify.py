"""change feed: notify listeners once per inserting statement

The API's stream hub (services/stream.py) holds one `LISTEN motorcade_change_feed` connection
per process. A statement-level trigger sends `pg_notify('motorcade_change_feed', '')` after
every statement that inserts into `change_feed`; PostgreSQL delivers it at commit, and folds
identical notifications of one transaction into one, so a writer adds one small queue entry
per transaction whatever its row count. The notification carries nothing: the hub reads the
rows by id (the primary key), which also catches up after a lost connection.

A second statement-level trigger, `BEFORE INSERT`, takes the transaction's id
(`pg_current_xact_id()`) before the statement draws any feed id: the hub's commit-order rule
(services/stream.py) relies on a transaction holding its id before it holds a feed id.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION change_feed_take_xid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_current_xact_id();
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER change_feed_take_xid BEFORE INSERT ON change_feed
        FOR EACH STATEMENT EXECUTE FUNCTION change_feed_take_xid()
        """
    )
    op.execute(
        """
        CREATE OR REPLACE FUNCTION change_feed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('motorcade_change_feed', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER change_feed_notify AFTER INSERT ON change_feed
        FOR EACH STATEMENT EXECUTE FUNCTION change_feed_notify()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS change_feed_notify ON change_feed")
    op.execute("DROP FUNCTION IF EXISTS change_feed_notify()")
    op.execute("DROP TRIGGER IF EXISTS change_feed_take_xid ON change_feed")
    op.execute("DROP FUNCTION IF EXISTS change_feed_take_xid()")
