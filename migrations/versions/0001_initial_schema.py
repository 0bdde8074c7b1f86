"""initial schema: vehicles, releases, desired states, rollouts and their targets, timeline
events (hash-partitioned), the append-only audit log, the SSE change feed, idempotency keys

Revision ID: 0001
Revises:
Create Date: 2026-11-28 03:28:38.769763
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

TIMELINE_PARTITIONS = 16

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target_type", sa.Text(), nullable=False),
        sa.Column("target_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("regions", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("models", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("orgs", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_action_at", "audit_log", ["action", "at", "id"], unique=False)
    op.create_index("ix_audit_actor_at", "audit_log", ["actor", "at", "id"], unique=False)
    op.create_index("ix_audit_at", "audit_log", ["at", "id"], unique=False)
    op.create_index("ix_audit_correlation", "audit_log", ["correlation_id"], unique=False)
    op.create_index(
        "ix_audit_target_at", "audit_log", ["target_type", "target_id", "at", "id"], unique=False
    )
    op.create_table(
        "change_feed",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("entity_id", sa.Text(), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("region", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("org", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_change_feed_created", "change_feed", ["created_at"], unique=False)
    op.create_index("ix_change_feed_topic_id", "change_feed", ["topic", "id"], unique=False)
    op.create_table(
        "desired_states",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("vehicle_id", sa.Text(), nullable=False),
        sa.Column("release_version", sa.Text(), nullable=False),
        sa.Column("rollout_id", sa.BigInteger(), nullable=True),
        sa.Column("previous_desired_state_id", sa.UUID(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_desired_states_created", "desired_states", ["created_at", "id"], unique=False
    )
    op.create_index(
        "ix_desired_states_rollout", "desired_states", ["rollout_id", "vehicle_id"], unique=False
    )
    op.create_index(
        "ix_desired_states_vehicle_created",
        "desired_states",
        ["vehicle_id", "created_at", "id"],
        unique=False,
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("caller", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="in_flight", nullable=False),
        sa.Column("response_status", sa.SmallInteger(), nullable=True),
        sa.Column(
            "response_body",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("null"),
            nullable=True,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("caller", "key"),
    )
    op.create_index("ix_idempotency_expires", "idempotency_keys", ["expires_at"], unique=False)
    op.create_table(
        "releases",
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column(
            "components",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("artifact_digest", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("signing_key_id", sa.Text(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_index("ix_releases_created", "releases", ["created_at", "version"], unique=False)
    op.create_table(
        "rollout_targets",
        sa.Column("rollout_id", sa.BigInteger(), nullable=False),
        sa.Column("vehicle_id", sa.Text(), nullable=False),
        sa.Column("stage", sa.SmallInteger(), nullable=False),
        sa.Column("rank", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Text(), server_default="planned", nullable=False),
        sa.Column("attempt", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("reason_code", sa.Text(), nullable=True),
        sa.Column("desired_state_id", sa.UUID(), nullable=True),
        sa.Column("previous_desired_state_id", sa.UUID(), nullable=True),
        sa.Column("previous_release_version", sa.Text(), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("rollout_id", "vehicle_id"),
    )
    op.create_index(
        "ix_rollout_targets_stage_state",
        "rollout_targets",
        ["rollout_id", "stage", "state", "vehicle_id"],
        unique=False,
    )
    op.create_index(
        "ix_rollout_targets_state",
        "rollout_targets",
        ["rollout_id", "state", "vehicle_id"],
        unique=False,
    )
    op.create_index("ix_rollout_targets_vehicle", "rollout_targets", ["vehicle_id"], unique=False)
    op.create_table(
        "rollouts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("release_version", sa.Text(), nullable=False),
        sa.Column(
            "targets",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "strategy",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "gates",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "timeouts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "retry",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("stage", sa.Text(), nullable=True),
        sa.Column("stage_index", sa.Integer(), server_default="0", nullable=False),
        sa.Column("stage_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("workflow_id", sa.Text(), nullable=True),
        sa.Column("waiting_for", sa.Text(), nullable=True),
        sa.Column("targeted", sa.Integer(), server_default="0", nullable=False),
        sa.Column("notified", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updating", sa.Integer(), server_default="0", nullable=False),
        sa.Column("succeeded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("blocked", sa.Integer(), server_default="0", nullable=False),
        sa.Column("pending", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "safety_acknowledgement",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("null"),
            nullable=True,
        ),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollouts_created", "rollouts", ["created_at", "id"], unique=False)
    op.create_index("ix_rollouts_release_id", "rollouts", ["release_version", "id"], unique=False)
    op.create_index("ix_rollouts_status_id", "rollouts", ["status", "id"], unique=False)
    op.create_table(
        "timeline_events",
        sa.Column("vehicle_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("desired_state_id", sa.UUID(), nullable=True),
        sa.Column("release_version", sa.Text(), nullable=True),
        sa.Column("reason_code", sa.Text(), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("vehicle_id", "event_id"),
        postgresql_partition_by="HASH (vehicle_id)",
    )
    op.create_index(
        "ix_timeline_vehicle_seq", "timeline_events", ["vehicle_id", "seq"], unique=False
    )
    op.create_table(
        "vehicles",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("ring", sa.Text(), nullable=False),
        sa.Column("org", sa.Text(), server_default="default", nullable=False),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("desired_release_version", sa.Text(), nullable=True),
        sa.Column("desired_state_id", sa.UUID(), nullable=True),
        sa.Column("rollout_id", sa.BigInteger(), nullable=True),
        sa.Column("actual_release_version", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column(
            "reason_codes",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "last_seen_key",
            sa.DateTime(timezone=True),
            sa.Computed(
                "coalesce(last_seen_at, '1970-01-01 00:00:00+00'::timestamptz)", persisted=True
            ),
            nullable=False,
        ),
        sa.Column("battery_percent", sa.SmallInteger(), nullable=True),
        sa.Column("stationary", sa.Boolean(), nullable=True),
        sa.Column("last_event_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_vehicles_actual_release_id", "vehicles", ["actual_release_version", "id"], unique=False
    )
    op.create_index(
        "ix_vehicles_desired_release_id",
        "vehicles",
        ["desired_release_version", "id"],
        unique=False,
    )
    op.create_index(
        "ix_vehicles_id_pattern",
        "vehicles",
        ["id"],
        unique=False,
        postgresql_ops={"id": "text_pattern_ops"},
    )
    op.create_index("ix_vehicles_last_seen_id", "vehicles", ["last_seen_key", "id"], unique=False)
    op.create_index("ix_vehicles_model_id", "vehicles", ["model", "id"], unique=False)
    op.create_index("ix_vehicles_org_id", "vehicles", ["org", "id"], unique=False)
    op.create_index(
        "ix_vehicles_reason_codes",
        "vehicles",
        ["reason_codes"],
        unique=False,
        postgresql_using="gin",
    )
    op.create_index("ix_vehicles_region_id", "vehicles", ["region", "id"], unique=False)
    op.create_index("ix_vehicles_ring_id", "vehicles", ["ring", "id"], unique=False)
    op.create_index("ix_vehicles_rollout_id", "vehicles", ["rollout_id", "id"], unique=False)
    op.create_index("ix_vehicles_status_id", "vehicles", ["status", "id"], unique=False)

    for remainder in range(TIMELINE_PARTITIONS):
        op.execute(
            f"CREATE TABLE timeline_events_p{remainder:02d} PARTITION OF timeline_events "
            f"FOR VALUES WITH (MODULUS {TIMELINE_PARTITIONS}, REMAINDER {remainder})"
        )
    op.execute(
        """
        CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_log_no_update ON audit_log")
    op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    op.drop_index("ix_vehicles_status_id", table_name="vehicles")
    op.drop_index("ix_vehicles_rollout_id", table_name="vehicles")
    op.drop_index("ix_vehicles_ring_id", table_name="vehicles")
    op.drop_index("ix_vehicles_region_id", table_name="vehicles")
    op.drop_index("ix_vehicles_reason_codes", table_name="vehicles", postgresql_using="gin")
    op.drop_index("ix_vehicles_org_id", table_name="vehicles")
    op.drop_index("ix_vehicles_model_id", table_name="vehicles")
    op.drop_index("ix_vehicles_last_seen_id", table_name="vehicles")
    op.drop_index(
        "ix_vehicles_id_pattern", table_name="vehicles", postgresql_ops={"id": "text_pattern_ops"}
    )
    op.drop_index("ix_vehicles_desired_release_id", table_name="vehicles")
    op.drop_index("ix_vehicles_actual_release_id", table_name="vehicles")
    op.drop_table("vehicles")
    op.drop_index("ix_timeline_vehicle_seq", table_name="timeline_events")
    op.drop_table("timeline_events")
    op.drop_index("ix_rollouts_status_id", table_name="rollouts")
    op.drop_index("ix_rollouts_release_id", table_name="rollouts")
    op.drop_index("ix_rollouts_created", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_rollout_targets_vehicle", table_name="rollout_targets")
    op.drop_index("ix_rollout_targets_state", table_name="rollout_targets")
    op.drop_index("ix_rollout_targets_stage_state", table_name="rollout_targets")
    op.drop_table("rollout_targets")
    op.drop_index("ix_releases_created", table_name="releases")
    op.drop_table("releases")
    op.drop_index("ix_idempotency_expires", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_desired_states_vehicle_created", table_name="desired_states")
    op.drop_index("ix_desired_states_rollout", table_name="desired_states")
    op.drop_index("ix_desired_states_created", table_name="desired_states")
    op.drop_table("desired_states")
    op.drop_index("ix_change_feed_topic_id", table_name="change_feed")
    op.drop_index("ix_change_feed_created", table_name="change_feed")
    op.drop_table("change_feed")
    op.drop_index("ix_audit_target_at", table_name="audit_log")
    op.drop_index("ix_audit_correlation", table_name="audit_log")
    op.drop_index("ix_audit_at", table_name="audit_log")
    op.drop_index("ix_audit_actor_at", table_name="audit_log")
    op.drop_index("ix_audit_action_at", table_name="audit_log")
    op.drop_table("audit_log")
