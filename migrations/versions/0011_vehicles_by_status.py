"""vehicles by status: the `(status, id)` keys of the fleet, kept by statement triggers

`vehicles.status` has no index, on purpose: a rollout's issue and every status-changing event
rewrite the wide row, and an index on `status` would make each of those a non-HOT update of
all of its indexes (docs/data-model.md). Yet `GET /vehicles?sort=status` needs the fleet in
status order and `?status=failed` the few failed vehicles, without reading a million rows.

`vehicles_by_status` holds one `(status, id)` key per vehicle; its primary key is the order.
Statement-level triggers with transition tables keep it equal to `vehicles` in the same
transaction as every write, whoever writes (ingest, a rollout's issue, the offline sweep,
registration, a test, psql): after an UPDATE, one statement moves the keys of the rows whose
status changed (the old and new rows paired by `id`, which never changes); after an INSERT or
COPY one statement adds the keys; DELETE and TRUNCATE remove them. One statement per writing
statement, not one per row. An earlier attempt (docs/data-model.md) wrote the pairing join as
plain SQL in the function: PL/pgSQL cached the plan of the first call, a nested loop fit for
one row, and every later statement paid 3,000 x 3,000 comparisons.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The old and new rows of an UPDATE pair up by `id`; the join runs through EXECUTE, planned for
# each statement's row counts (a cached plan made for a one-row statement would keep a nested
# loop over both transition tables: seconds for 3,000 rows). The keys then move by their
# primary key, one index probe each: `force_generic_plan` keeps `unnest` at the planner's
# default estimate, where a custom plan that sees 3,000 values hashes the whole key table.
_MOVE = """
    DECLARE was text[]; became text[]; ids text[];
    BEGIN
        EXECUTE 'SELECT array_agg(o.status), array_agg(n.status), array_agg(n.id)'
            ' FROM old_vehicles o JOIN new_vehicles n ON n.id = o.id WHERE n.status <> o.status'
            INTO was, became, ids;
        IF ids IS NOT NULL THEN
            UPDATE vehicles_by_status k SET status = c.status
            FROM unnest(was, became, ids) AS c(was, status, id)
            WHERE k.status = c.was AND k.id = c.id;
        END IF;
        RETURN NULL;
    END
"""
_DROP = """
    DECLARE was text[]; ids text[];
    BEGIN
        SELECT array_agg(o.status), array_agg(o.id) INTO was, ids FROM old_vehicles o;
        DELETE FROM vehicles_by_status k USING unnest(was, ids) AS c(status, id)
        WHERE k.status = c.status AND k.id = c.id;
        RETURN NULL;
    END
"""
_ADD = """
    BEGIN
        INSERT INTO vehicles_by_status (status, id) SELECT n.status, n.id FROM new_vehicles n;
        RETURN NULL;
    END
"""
_EMPTY = "BEGIN TRUNCATE vehicles_by_status; RETURN NULL; END"

# name: (body, trigger event and transition tables)
_TRIGGERS = {
    "vehicles_by_status_insert": (
        _ADD, "AFTER INSERT ON vehicles REFERENCING NEW TABLE AS new_vehicles"
    ),
    "vehicles_by_status_update": (
        _MOVE,
        "AFTER UPDATE ON vehicles REFERENCING OLD TABLE AS old_vehicles NEW TABLE AS new_vehicles",
    ),
    "vehicles_by_status_delete": (
        _DROP, "AFTER DELETE ON vehicles REFERENCING OLD TABLE AS old_vehicles"
    ),
    "vehicles_by_status_truncate": (_EMPTY, "AFTER TRUNCATE ON vehicles"),
}  # fmt: skip


def upgrade() -> None:
    op.execute(
        "CREATE TABLE vehicles_by_status ("
        " status text NOT NULL, id text NOT NULL, PRIMARY KEY (status, id))"
    )
    op.execute("INSERT INTO vehicles_by_status (status, id) SELECT status, id FROM vehicles")
    for name, (body, event) in _TRIGGERS.items():
        op.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql"
            f" SET plan_cache_mode = force_generic_plan AS $${body}$$"
        )
        op.execute(f"CREATE TRIGGER {name} {event} FOR EACH STATEMENT EXECUTE FUNCTION {name}()")
    op.execute("ANALYZE vehicles_by_status")


def downgrade() -> None:
    for name in _TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON vehicles")
        op.execute(f"DROP FUNCTION {name}()")
    op.execute("DROP TABLE vehicles_by_status")
