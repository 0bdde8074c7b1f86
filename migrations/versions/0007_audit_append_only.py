"""audit log: append-only except for the retention purge

The trigger of 0001 refused UPDATE only. Now DELETE is refused too, unless the transaction
set `motorcade.audit_purge` to `on` (`SELECT set_config('motorcade.audit_purge', 'on', true)`),
which only the retention purge (`services.audit.purge_expired`) does. This guards against the
application (or an operator's slip) deleting entries; it is not a defence against a database
role that may change settings or drop triggers. The purge walks the existing `(at, id)` index;
every list filter is already served by an index of 0001 (actor, action, target, correlation).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE'
               AND coalesce(current_setting('motorcade.audit_purge', true), '') = 'on' THEN
                RETURN OLD;
            END IF;
            RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete ON audit_log")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP;
        END $$
        """
    )
