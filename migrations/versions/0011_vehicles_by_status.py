"""vehicles by status: the `(status, id)` keys of the fleet, kept by statement triggers

`vehicles.status` has no index, on purpose: a rollout's issue and every status-changing event
rewrite the wide row, and an index on `status` would make each of those a non-HOT update of
all of its indexes (docs/data-model.md). Yet `GET /vehicles?sort=status` needs the fleet in
status order and `?status=failed` the few failed vehicles, without reading a million rows.

`vehicles_by_status` holds one `(status, id)` key per vehicle; its primary key is the order.
Statement-level triggers with transition tables keep it equal to `vehicles` in the same
transaction as every write, whoever writes (ingest, a rollout's issue, the offline sweep,
registration, a test, psql): after an UPDATE, one statement moves the keys of the rows whose
status changed (the old and new rows paired as PostgreSQL captured them, below); after an
INSERT or COPY one statement adds the keys; DELETE and TRUNCATE remove them. One statement
per writing statement, not one per row. An earlier attempt (docs/data-model.md) paired old
and new rows by a join in the function's SQL: PL/pgSQL cached the plan of the first call, a
nested loop fit for one row, and every later statement paid 3,000 x 3,000 comparisons.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The old and new rows of an UPDATE: PostgreSQL captures them pairwise, the i-th old row and
# the i-th new row are one row before and after, so the two tables are read in order and
# zipped (checked: the ids must match; a statement that changed an id drops every old key and
# adds every new one). The keys of the rows whose status changed then move by their primary
# key, one index probe each: `force_generic_plan` keeps `unnest` at the planner's default
# estimate (a custom plan that sees 3,000 values hashes the whole key table instead). No
# join in SQL: a plan cached for the first, one-row statement would keep a nested loop over
# both transition tables (2.3 s for 3,000 rows, measured).
_MOVE = """
    DECLARE old_ids text[]; was text[]; ids text[]; became text[];
    BEGIN
        SELECT array_agg(o.id), array_agg(o.status) INTO old_ids, was FROM old_vehicles o;
        SELECT array_agg(n.id), array_agg(n.status) INTO ids, became FROM new_vehicles n;
        IF ids IS NULL THEN
            RETURN NULL;
        END IF;
        IF old_ids = ids THEN
            UPDATE vehicles_by_status k SET status = c.status
            FROM unnest(was, became, ids) AS c(was, status, id)
            WHERE c.was <> c.status AND k.status = c.was AND k.id = c.id;
        ELSE
            DELETE FROM vehicles_by_status k USING unnest(was, old_ids) AS c(status, id)
            WHERE k.status = c.status AND k.id = c.id;
            INSERT INTO vehicles_by_status (status, id) SELECT * FROM unnest(became, ids);
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
