"""The API's own tables (keys, audit log, silences), registered on the store's metadata."""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.store import metadata

TS = sa.DateTime(timezone=True)
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

api_keys = sa.Table(
    "api_keys",
    metadata,
    # The public part of the key (`mwk_<key_id>_<secret>`): found by it, then the hash is compared.
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False),
    # Space-separated scope names.
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("last_used_at", TS),
    sa.Column("revoked_at", TS),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("audit_id", AUTO_ID, primary_key=True, autoincrement=True),
    sa.Column("ts", TS, nullable=False),
    sa.Column("client_ip", sa.Text, nullable=False),
    # Null when the caller did not authenticate (missing or wrong key).
    sa.Column("key_id", sa.String(16)),
    sa.Column("key_name", sa.Text),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    # ok, missing_key, bad_key, revoked_key, rate_limited, forbidden, error
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("duration_ms", sa.Float),
    sa.Column("user_agent", sa.Text),
    sa.Index("ix_audit_log_ts", "ts"),
    sa.Index("ix_audit_log_client_ip_ts", "client_ip", "ts"),
    sa.Index("ix_audit_log_key_id_ts", "key_id", "ts"),
)

silences = sa.Table(
    "silences",
    metadata,
    sa.Column("silence_id", sa.String(32), primary_key=True),
    # Matchers: null means "any"; at least one is set (checked by the API).
    sa.Column("detector", sa.String(64)),
    sa.Column("entity", sa.Text),
    sa.Column("cidr", sa.String(64)),
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("expires_at", TS, nullable=False),
    sa.Index("ix_silences_expires_at", "expires_at"),
)
