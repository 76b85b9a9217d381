"""Store upkeep: daily event partitions made ahead on PostgreSQL, and retention on both dialects."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.schema import StoreError

log = logging.getLogger(__name__)

PARTITION_PREFIX = "events_p"
DEFAULT_PARTITION = "events_default"
_PARTITION_NAME = re.compile(rf"^{PARTITION_PREFIX}(\d{{8}})$")
# One key for every maintainer: two processes creating the same day's partition would collide.
MAINTENANCE_LOCK_KEY = 0x6D77_0005
# SQLite deletes this many rows per transaction, so ingest and the API are never blocked for long.
DELETE_BATCH = 20_000
# Upkeep waits this long for a table lock, then gives up until its next run (ingest keeps going).
LOCK_TIMEOUT = "10s"


@dataclass
class MaintenanceSummary:
    created: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    dropped: list[str] = field(default_factory=list)
    deleted: int = 0


def day_of(value: datetime) -> date:
    return value.astimezone(timezone.utc).date()


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def is_partitioned(conn: Connection) -> bool:
    """True when `events` (as the search path finds it) is a partitioned PostgreSQL table."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        sa.text("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass('events')")
    ).scalar()
    return kind == "p"


def partition_days(conn: Connection) -> dict[date, str]:
    """The daily partitions of `events`, by day (the DEFAULT partition is not listed)."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass('events')"
        )
    ).scalars()
    days = {}
    for name in rows:
        match = _PARTITION_NAME.match(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return days


def _lock(conn: Connection) -> None:
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MAINTENANCE_LOCK_KEY})


def create_partition(engine: Engine, day: date) -> tuple[bool, int]:
    """Make the partition of `day` (UTC) if missing, moving its rows out of DEFAULT first.

    PostgreSQL refuses a new partition while DEFAULT holds rows in its range, so such rows are
    moved into a free-standing table that is then attached. Returns (created, rows moved).
    """
    name = partition_name(day)
    lo, hi = _midnight(day), _midnight(day + timedelta(days=1))
    with engine.begin() as conn:
        _lock(conn)
        if day in partition_days(conn):
            return False, 0
        # Inserts take ROW EXCLUSIVE on the parent; this waits for them and holds new ones back,
        # so no row can slip into DEFAULT between the move and the attach.
        conn.execute(sa.text("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE"))
        in_default = conn.execute(
            sa.text(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} WHERE ts >= :lo AND ts < :hi)"),
            {"lo": lo, "hi": hi},
        ).scalar()
        bounds = f"FROM ('{lo:%Y-%m-%d %H:%M:%S}+00') TO ('{hi:%Y-%m-%d %H:%M:%S}+00')"
        if not in_default:
            conn.execute(sa.text(f"CREATE TABLE {name} PARTITION OF events FOR VALUES {bounds}"))
            return True, 0
        conn.execute(sa.text(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)"))
        moved = conn.execute(
            sa.text(
                f"WITH gone AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= :lo AND ts < :hi RETURNING *) "
                f"INSERT INTO {name} SELECT * FROM gone"
            ),
            {"lo": lo, "hi": hi},
        ).rowcount
        # Attaching builds the parent's indexes and key on the new table.
        conn.execute(sa.text(f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES {bounds}"))
    return True, moved


def ensure_partitions(engine: Engine, now: datetime, days_ahead: int, oldest: date | None = None) -> MaintenanceSummary:
    """Partitions from yesterday to `days_ahead` after `now`, plus a home for every day now in DEFAULT."""
    summary = MaintenanceSummary()
    with engine.connect() as conn:
        if not is_partitioned(conn):
            return summary
        have = partition_days(conn)
        stray = {
            d
            for d in conn.execute(
                sa.text(f"SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM {DEFAULT_PARTITION}")
            ).scalars()
        }
    today = day_of(now)
    wanted = {today + timedelta(days=i) for i in range(-1, days_ahead + 1)} | stray
    if oldest is not None:
        # Days retention is about to remove do not get a partition of their own.
        wanted = {d for d in wanted if d >= oldest}
    for day in sorted(wanted - set(have)):
        made, moved = create_partition(engine, day)
        if made:
            summary.created.append(partition_name(day))
            summary.moved_from_default += moved
    return summary


def retention_cutoff(now: datetime, retention_days: int) -> datetime:
    """Events before this instant are expired: whole UTC days, so partitions drop whole."""
    return _midnight(day_of(now) - timedelta(days=retention_days))


def drop_expired(engine: Engine, cutoff: datetime, batch: int = DELETE_BATCH) -> MaintenanceSummary:
    """Remove events with ts < cutoff: dropped partitions on PostgreSQL, batched deletes elsewhere."""
    summary = MaintenanceSummary()
    cutoff = cutoff.astimezone(timezone.utc)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            partitioned = is_partitioned(conn)
            days = partition_days(conn) if partitioned else {}
        for day, name in sorted(days.items()):
            if _midnight(day + timedelta(days=1)) <= cutoff:
                with engine.begin() as conn:
                    _lock(conn)
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
                summary.dropped.append(name)
        # Rows in DEFAULT (or in an unpartitioned table) go by batched delete.
        table = DEFAULT_PARTITION if partitioned else "events"
        delete = sa.text(
            f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE ts < :cutoff LIMIT :n)"
        )
        params = {"cutoff": cutoff, "n": batch}
    elif engine.dialect.name == "sqlite":
        delete = sa.text("DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE ts < :cutoff LIMIT :n)")
        # The text form SQLAlchemy stores, so the comparison is the same ordering as the index.
        params = {"cutoff": cutoff.strftime("%Y-%m-%d %H:%M:%S.%f"), "n": batch}
    else:
        raise StoreError(f"unsupported database dialect {engine.dialect.name}")
    while True:
        with engine.begin() as conn:
            gone = conn.execute(delete, params).rowcount
        summary.deleted += gone
        if gone < batch:
            break
    return summary


def maintain(engine: Engine, now: datetime, days_ahead: int = 7, retention_days: int | None = None) -> MaintenanceSummary:
    """One maintenance run: expire old events, then make sure tomorrow's partitions exist."""
    summary = MaintenanceSummary()
    oldest = None
    if retention_days is not None:
        cutoff = retention_cutoff(now, retention_days)
        oldest = cutoff.date()
        expired = drop_expired(engine, cutoff)
        summary.dropped, summary.deleted = expired.dropped, expired.deleted
    made = ensure_partitions(engine, now, days_ahead, oldest)
    summary.created, summary.moved_from_default = made.created, made.moved_from_default
    if summary.created or summary.dropped or summary.deleted:
        log.info(
            "maintenance: %d partitions created (%d rows moved from default), %d dropped, %d rows deleted",
            len(summary.created), summary.moved_from_default, len(summary.dropped), summary.deleted,
        )
    return summary
