"""Notifications: the outbox, the delivery log and the per-destination rate-limit buckets.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("notification_id", sa.String(40), primary_key=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("alert_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("severity", sa.Integer, nullable=False),
        sa.Column("group_key", sa.String(255), nullable=False),
        sa.Column("alert", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("claim", sa.String(32)),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_attempt_at", TS),
        sa.Column("delivered_at", TS),
        sa.Column("message_id", sa.String(40)),
        sa.Column("last_error", sa.Text),
        sa.UniqueConstraint("route", "alert_id", "seq", name="uq_outbox_route_alert_seq"),
    )
    op.create_index("ix_outbox_due", "outbox", ["status", "next_attempt_at"])
    op.create_index("ix_outbox_route_group", "outbox", ["route", "group_key"])
    op.create_table(
        "deliveries",
        # INTEGER on SQLite so the key is the rowid and autoincrements; BIGINT identity on PostgreSQL.
        sa.Column("delivery_id", BIGINT_ID, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(40), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        sa.Column("destination", sa.String(16), nullable=False),
        sa.Column("alert_count", sa.Integer, nullable=False),
        sa.Column("digest", sa.Boolean, nullable=False),
        sa.Column("attempted_at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("retry_after", sa.Float),
        sa.Column("duration_ms", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_deliveries_route_attempted", "deliveries", ["route", "attempted_at"])
    op.create_index("ix_deliveries_message", "deliveries", ["message_id"])
    op.create_table(
        "notify_buckets",
        sa.Column("bucket_key", sa.String(64), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("notify_buckets", "deliveries", "outbox"):
        op.drop_table(table)
