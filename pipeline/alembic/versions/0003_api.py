"""API tables: hashed API keys with scopes, the request audit log, alert silences.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("revoked_at", TS),
    )
    op.create_table(
        "audit_log",
        sa.Column("audit_id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("client_ip", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(16)),
        sa.Column("key_name", sa.Text),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("duration_ms", sa.Float),
        sa.Column("user_agent", sa.Text),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_index("ix_audit_log_client_ip_ts", "audit_log", ["client_ip", "ts"])
    op.create_index("ix_audit_log_key_id_ts", "audit_log", ["key_id", "ts"])
    op.create_table(
        "silences",
        sa.Column("silence_id", sa.String(32), primary_key=True),
        sa.Column("detector", sa.String(64)),
        sa.Column("entity", sa.Text),
        sa.Column("cidr", sa.String(64)),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_silences_expires_at", "silences", ["expires_at"])


def downgrade() -> None:
    for table in ("silences", "audit_log", "api_keys"):
        op.drop_table(table)
