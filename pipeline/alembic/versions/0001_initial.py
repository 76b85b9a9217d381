"""Initial schema: events, quarantine, checkpoints, alerts.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("event_id", sa.String(40), primary_key=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("source_ip", sa.Text),
        sa.Column("service", sa.Text),
        sa.Column("scheme", sa.Text),
        sa.Column("method", sa.Text),
        sa.Column("path", sa.Text),
        sa.Column("status", sa.BigInteger),
        sa.Column("outcome", sa.Text),
        sa.Column("api_key_id", sa.Text),
        sa.Column("account", sa.Text),
        sa.Column("user_agent", sa.Text),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("duration_ms", sa.Float),
        sa.Column("recipients", sa.BigInteger),
        sa.Column("flags", sa.Text),
        sa.Column("origin", sa.Text),
    )
    op.create_index("ix_events_ts", "events", ["ts"])
    op.create_index("ix_events_source_ip_ts", "events", ["source_ip", "ts"])
    for col in ("api_key_id", "account"):
        # Partial: events without a key or account would only slow ingest in these indexes.
        where = sa.text(f"{col} IS NOT NULL")
        op.create_index(f"ix_events_{col}_ts", "events", [col, "ts"], sqlite_where=where, postgresql_where=where)
    op.create_table(
        "quarantine",
        sa.Column("quarantine_id", sa.String(40), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("source_key", sa.String(64), nullable=False),
        sa.Column("line_no", sa.BigInteger, nullable=False),
        sa.Column("byte_offset", sa.BigInteger, nullable=False),
        sa.Column("parser", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("received_at", TS, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("source_key", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("dev", sa.BigInteger),
        sa.Column("inode", sa.BigInteger),
        sa.Column("first_line_hash", sa.String(64)),
        sa.Column("probe_len", sa.BigInteger),
        sa.Column("probe_hash", sa.String(64)),
        sa.Column("byte_offset", sa.BigInteger, nullable=False),
        sa.Column("line_no", sa.BigInteger, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(40), primary_key=True),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("severity", sa.Integer, nullable=False),
        sa.Column("entity_kind", sa.String(16), nullable=False),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("window_end", TS, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("mitre", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "job_state",
        sa.Column("job", sa.String(64), primary_key=True),
        sa.Column("watermark", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_alerts_detector_window", "alerts", ["detector", "window_start"])
    op.create_index("ix_alerts_status", "alerts", ["status"])


def downgrade() -> None:
    for table in ("job_state", "alerts", "checkpoints", "quarantine", "events"):
        op.drop_table(table)
