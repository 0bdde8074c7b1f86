"""vehicle status keys: the fleet list's status filter and sort served by an index

`vehicles` has no index on `status` on purpose: a status change (every event, a rollout's
issue) must stay a heap-only (HOT) update that writes no index entry into the table's nine
indexes. The status filter and `sort=status` of `GET /vehicles` read instead the narrow
`vehicle_status_keys` (status, id), one row per vehicle, with one index (its primary key) that
gives the vehicles of a status in id order, and the fleet in (status, id) order.

Triggers keep it equal to `vehicles` in the same transaction, whoever writes: statement
triggers with transition tables move the keys of the vehicles an update changed the status
of, add the keys of inserted vehicles (COPY included) and remove those of deleted ones, in
one statement each (a row trigger per status change cost a third more); a truncate empties
it. The vehicles' id never changes (nothing updates it).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE vehicle_status_keys (
            status text NOT NULL,
            id text NOT NULL,
            CONSTRAINT vehicle_status_keys_pkey PRIMARY KEY (status, id)
        )
        """
    )
    op.execute(
        "INSERT INTO vehicle_status_keys (status, id) SELECT status, id FROM vehicles"
        " ORDER BY status, id"
    )
    op.execute(
        """
        CREATE FUNCTION vehicle_status_keys_move() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            WITH moved AS MATERIALIZED (
                SELECT o.status AS was, n.status, n.id
                FROM before o JOIN after n ON n.id = o.id
                WHERE n.status IS DISTINCT FROM o.status
            ),
            gone AS (
                DELETE FROM vehicle_status_keys k USING moved m
                WHERE k.status = m.was AND k.id = m.id
            )
            INSERT INTO vehicle_status_keys (status, id)
            SELECT status, id FROM moved ORDER BY status, id
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER vehicle_status_keys_move AFTER UPDATE ON vehicles
        REFERENCING OLD TABLE AS before NEW TABLE AS after
        FOR EACH STATEMENT EXECUTE FUNCTION vehicle_status_keys_move()
        """
    )
    op.execute(
        """
        CREATE FUNCTION vehicle_status_keys_add() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO vehicle_status_keys (status, id) SELECT status, id FROM added
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER vehicle_status_keys_add AFTER INSERT ON vehicles
        REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION vehicle_status_keys_add()
        """
    )
    op.execute(
        """
        CREATE FUNCTION vehicle_status_keys_remove() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM vehicle_status_keys k USING removed r
            WHERE k.status = r.status AND k.id = r.id;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER vehicle_status_keys_remove AFTER DELETE ON vehicles
        REFERENCING OLD TABLE AS removed
        FOR EACH STATEMENT EXECUTE FUNCTION vehicle_status_keys_remove()
        """
    )
    op.execute(
        """
        CREATE FUNCTION vehicle_status_keys_clear() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            TRUNCATE vehicle_status_keys;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER vehicle_status_keys_clear AFTER TRUNCATE ON vehicles
        FOR EACH STATEMENT EXECUTE FUNCTION vehicle_status_keys_clear()
        """
    )


def downgrade() -> None:
    for trigger in ("move", "add", "remove", "clear"):
        op.execute(f"DROP TRIGGER IF EXISTS vehicle_status_keys_{trigger} ON vehicles")
        op.execute(f"DROP FUNCTION IF EXISTS vehicle_status_keys_{trigger}()")
    op.execute("DROP TABLE IF EXISTS vehicle_status_keys")
