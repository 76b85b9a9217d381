"""Detection state: the API-key revocation list and the trained isolation-forest models.

Revision ID: 0004
Revises: 0005

Numbered 0004 as assigned; it chains after 0005, the newest revision when it was written.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "revoked_keys",
        # Keyed fingerprint of the API key (pipeline.privacy.fingerprint), never the key itself.
        sa.Column("key_id", sa.String(64), primary_key=True),
        # From when presenting the key is a finding; null: always.
        sa.Column("revoked_at", TS),
        sa.Column("added_at", TS, nullable=False),
        sa.Column("note", sa.Text),
    )
    op.create_table(
        "models",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("features", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("sklearn_version", sa.String(32), nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("trained_from", TS),
        sa.Column("trained_to", TS),
        sa.Column("trained_at", TS, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("models")
    op.drop_table("revoked_keys")
