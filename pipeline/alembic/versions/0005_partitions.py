"""Scale-out: events partitioned by day on PostgreSQL (plus a DEFAULT partition), and the job-run log.

Revision ID: 0005
Revises: 0003

PostgreSQL only: `events` becomes `PARTITION BY RANGE (ts)` with one partition per UTC day, so
retention drops whole partitions and a window query reads only the days it covers. A unique key on
a partitioned table must contain the partition key, so the primary key becomes (event_id, ts); an
event id already determines its ts (same line, same time), so this admits no extra duplicate.
SQLite keeps its plain table. Both dialects get `job_runs`, one row per scheduled job run, which
shows that several `mailwarden run` processes ran each tick once.
"""

from datetime import date, datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Partitions made ahead of today when migrating; the maintenance job keeps the horizon moving.
DAYS_AHEAD = 7
EVENT_INDEXES = ("ix_events_ts", "ix_events_source_ip_ts", "ix_events_api_key_id_ts", "ix_events_account_ts")


def _create_event_indexes() -> None:
    # On the parent: PostgreSQL creates the same index on every present and future partition.
    op.execute("CREATE INDEX ix_events_ts ON events (ts)")
    op.execute("CREATE INDEX ix_events_source_ip_ts ON events (source_ip, ts)")
    for col in ("api_key_id", "account"):
        op.execute(f"CREATE INDEX ix_events_{col}_ts ON events ({col}, ts) WHERE {col} IS NOT NULL")


def _day_literal(day: date) -> str:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00")


def _upgrade_postgresql() -> None:
    bind = op.get_bind()
    for name in EVENT_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.execute("ALTER TABLE events RENAME TO events_unpartitioned")
    op.execute("ALTER TABLE events_unpartitioned DROP CONSTRAINT IF EXISTS events_pkey")
    # LIKE copies every column (whatever earlier migrations added), types, NOT NULLs and defaults.
    op.execute(
        "CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (ts)"
    )
    op.execute("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (event_id, ts)")
    # Never reject an event: rows outside every daily partition land here until maintenance moves them.
    op.execute("CREATE TABLE events_default PARTITION OF events DEFAULT")
    days = {
        row[0]
        for row in bind.execute(
            sa.text("SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM events_unpartitioned")
        )
    }
    today = datetime.now(timezone.utc).date()
    days.update(today + timedelta(days=i) for i in range(-1, DAYS_AHEAD + 1))
    for day in sorted(days):
        op.execute(
            f"CREATE TABLE events_p{day:%Y%m%d} PARTITION OF events FOR VALUES FROM "
            f"('{_day_literal(day)}') TO ('{_day_literal(day + timedelta(days=1))}')"
        )
    _create_event_indexes()
    op.execute("INSERT INTO events SELECT * FROM events_unpartitioned")
    op.execute("DROP TABLE events_unpartitioned")
    op.execute("ANALYZE events")


def _downgrade_postgresql() -> None:
    for name in EVENT_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.execute("ALTER TABLE events RENAME TO events_partitioned")
    op.execute("ALTER TABLE events_partitioned DROP CONSTRAINT IF EXISTS events_pkey")
    op.execute("CREATE TABLE events (LIKE events_partitioned INCLUDING DEFAULTS)")
    op.execute("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (event_id)")
    op.execute("INSERT INTO events SELECT * FROM events_partitioned")
    op.execute("DROP TABLE events_partitioned CASCADE")
    _create_event_indexes()


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
    op.create_table(
        "job_runs",
        sa.Column("run_id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(64), nullable=False),
        # host:pid of the process that ran it: tells the scheduler replicas apart.
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("ok", sa.Boolean),
    )
    op.create_index("ix_job_runs_job_started", "job_runs", ["job", "started_at"])


def downgrade() -> None:
    op.drop_table("job_runs")
    if op.get_bind().dialect.name == "postgresql":
        _downgrade_postgresql()
