"""The SQL store: tables, bulk writes with their checkpoint in one transaction, and shared queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.schema import EVENT_COLUMNS, Alert, StoreError, event_ids, pandas_dtypes

log = logging.getLogger(__name__)

metadata = sa.MetaData()

_SA_TYPES = {
    "str": sa.Text,
    "datetime": lambda: sa.DateTime(timezone=True),
    "int": sa.BigInteger,
    "float": sa.Float,
}


def _event_columns() -> list[sa.Column]:
    cols = []
    for name, kind in EVENT_COLUMNS.items():
        if name == "event_id":
            cols.append(sa.Column(name, sa.String(40), primary_key=True))
        elif name == "ts":
            cols.append(sa.Column(name, sa.DateTime(timezone=True), nullable=False))
        else:
            cols.append(sa.Column(name, _SA_TYPES[kind]()))
    return cols


events = sa.Table(
    "events",
    metadata,
    *_event_columns(),
    sa.Index("ix_events_ts", "ts"),
    sa.Index("ix_events_source_ip_ts", "source_ip", "ts"),
)
# Partial: many events carry no key or no account, and an index entry per null only slows ingest.
for _col in ("api_key_id", "account"):
    _not_null = events.c[_col].isnot(None)
    sa.Index(f"ix_events_{_col}_ts", events.c[_col], events.c.ts, sqlite_where=_not_null, postgresql_where=_not_null)

quarantine = sa.Table(
    "quarantine",
    metadata,
    # Hash of (source identity, byte offset): re-reading a file does not duplicate its bad lines.
    sa.Column("quarantine_id", sa.String(40), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("source_key", sa.String(64), nullable=False),
    sa.Column("line_no", sa.BigInteger, nullable=False),
    sa.Column("byte_offset", sa.BigInteger, nullable=False),
    sa.Column("parser", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("source_key", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("dev", sa.BigInteger),
    sa.Column("inode", sa.BigInteger),
    sa.Column("first_line_hash", sa.String(64)),
    # Hash of the first `probe_len` bytes when first read: tells a rotated or compressed copy of
    # this file (same content, resume) from another file that merely starts with the same line.
    sa.Column("probe_len", sa.BigInteger),
    sa.Column("probe_hash", sa.String(64)),
    sa.Column("byte_offset", sa.BigInteger, nullable=False),
    sa.Column("line_no", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("alert_id", sa.String(40), primary_key=True),
    sa.Column("detector", sa.String(64), nullable=False),
    sa.Column("severity", sa.Integer, nullable=False),
    sa.Column("entity_kind", sa.String(16), nullable=False),
    sa.Column("entity", sa.Text, nullable=False),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("mitre", sa.String(32)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_alerts_detector_window", "detector", "window_start"),
    sa.Index("ix_alerts_status", "status"),
)

job_state = sa.Table(
    "job_state",
    metadata,
    # Per job, the data time it has covered: a restarted service catches up from here.
    sa.Column("job", sa.String(64), primary_key=True),
    sa.Column("watermark", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Raw lines longer than this are cut in quarantine (the offset still points at the full line).
QUARANTINE_RAW_LIMIT = 64 * 1024


@dataclass
class Checkpoint:
    source_key: str
    path: str
    dev: int | None
    inode: int | None
    first_line_hash: str | None
    byte_offset: int
    line_no: int
    probe_len: int | None = None
    probe_hash: str | None = None


@dataclass
class EncodedEvents:
    """A batch of events in the form the store's bulk path sends (see Store.encode_events)."""

    height: int
    names: list[str]
    columns: list[list[Any]]
    csv: bytes = b""


@dataclass
class WriteResult:
    inserted: int
    duplicates: int
    quarantined: int


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def clip_range(
    since: datetime | None, until: datetime | None, stored: tuple[datetime, datetime]
) -> tuple[datetime, datetime]:
    """[since, until] cut to the stored span (a missing end is that end of the span): only it can
    hold events, and a range of centuries would otherwise be stepped or bucketed through. The
    result has since > until when the range lies wholly outside the span."""
    return max(since or stored[0], stored[0]), min(until or stored[1], stored[1])


def make_engine(url: str) -> Engine:
    """Engine with SQLite tuned for bulk writes (WAL) or PostgreSQL with pre-ping."""
    try:
        backend = sa.engine.make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            # Otherwise the missing driver speaks ("No module named 'MySQLdb'"), not the real limit.
            raise StoreError(f"unsupported database {backend!r} in {redact_url(url)}: mailwarden stores in "
                             "SQLite (sqlite:///path/mailwarden.db) or PostgreSQL (postgresql+psycopg://…)")
        if url.startswith("sqlite"):
            db_path = sa.engine.make_url(url).database
            if db_path and db_path != ":memory:" and Path(db_path).expanduser().is_dir():
                raise StoreError(f"{db_path} is a directory: name a database file, e.g. "
                                 f"sqlite:///{Path(db_path) / 'mailwarden.db'}")
            if db_path and db_path != ":memory:":
                Path(db_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 60})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise StoreError(f"invalid database URL {redact_url(url)}: {exc}") from None
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives process crashes (not power loss): the trade-off SQLite documents.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=60000")
    # 64 MiB per connection (the ingest writer and the reader each have one): the entity-index
    # pages a batch touches stay in memory, while a bulk load (those indexes dropped) stays small.
    cur.execute("PRAGMA cache_size=-65536")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def redact_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"


class Store:
    """All database access of the pipeline goes through here."""

    def __init__(self, engine: Engine, read_engine: Engine | None = None):
        self.engine = engine
        self.dialect = engine.dialect.name
        # Event reads (detector windows, API searches and stats) may go to a replica; writes never do.
        self.read_engine = read_engine or engine

    @classmethod
    def open(cls, url: str, upgrade: bool = True, read_url: str | None = None, must_exist: bool = False) -> Store:
        """The store at `url`, its schema brought up to date. `must_exist`: for commands that only
        read, a SQLite path that holds no store is an error, not a new empty store at a typo."""
        if must_exist and url.startswith("sqlite"):
            db_path = sa.engine.make_url(url).database
            if db_path and db_path != ":memory:" and not Path(db_path).expanduser().is_file():
                raise StoreError(
                    f"no store at {db_path}: check --database-url or MAILWARDEN_DATABASE_URL "
                    "(`mailwarden ingest` or `mailwarden demo` creates one)"
                )
        store = cls(make_engine(url), make_engine(read_url) if read_url else None)
        if upgrade:
            store.upgrade()
        return store

    def upgrade(self) -> None:
        from pipeline.migrations import upgrade_to_head

        try:
            upgrade_to_head(self.engine)
            # A bulk load killed before its end leaves its indexes to be built here.
            self.ensure_indexes()
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open store {redact_url(str(self.engine.url))}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()

    # ---- checkpoints -------------------------------------------------------------------------
    def get_checkpoint(self, source_key: str) -> Checkpoint | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints).where(checkpoints.c.source_key == source_key)).first()
        if row is None:
            return None
        return Checkpoint(
            row.source_key, row.path, row.dev, row.inode, row.first_line_hash, row.byte_offset, row.line_no,
            row.probe_len, row.probe_hash,
        )

    def rewind_checkpoint(self, source_key: str, seen_offset: int, to_offset: int, to_line: int, row_id: str) -> bool:
        """Move a file's checkpoint back to `to_offset` and drop the event or quarantined line whose
        id is `row_id` (the line that starts there), in one transaction; only while the checkpoint is
        still at `seen_offset`. Returns whether it moved.

        For a last line that was read before its writer finished it: the next read takes the whole
        line again, and a crash right after this commit only means that line is read again.
        """
        with self.engine.begin() as conn:
            moved = conn.execute(
                checkpoints.update()
                .where(checkpoints.c.source_key == source_key, checkpoints.c.byte_offset == seen_offset)
                .values(byte_offset=to_offset, line_no=to_line)
            ).rowcount
            if moved:
                conn.execute(events.delete().where(events.c.event_id == row_id))
                conn.execute(quarantine.delete().where(quarantine.c.quarantine_id == row_id))
        return bool(moved)

    def forget_source(self, source_key: str) -> tuple[int, int]:
        """Undo what reading one file stored: its events, its quarantined lines, and its checkpoint
        (back to the start), in one transaction. Returns (events, quarantined lines) removed.

        For a file read with the wrong format: reading it again afterwards stores it as if new. A
        crash after this commit loses nothing, since the checkpoint now says to read it from the start.
        """
        # A file's event ids (schema.event_ids: its key's prefix and a zero-padded offset) form one
        # range, all of the same length and alphanumeric, so the range is the same under any collation.
        first, last = event_ids(source_key, [0, 10**16 - 1])
        with self.engine.begin() as conn:
            gone = conn.execute(events.delete().where(events.c.event_id.between(first, last))).rowcount
            bad = conn.execute(quarantine.delete().where(quarantine.c.source_key == source_key)).rowcount
            conn.execute(
                checkpoints.update().where(checkpoints.c.source_key == source_key).values(byte_offset=0, line_no=1)
            )
        return int(gone or 0), int(bad or 0)

    # ---- bulk writes -------------------------------------------------------------------------
    def encode_events(self, frame: pl.DataFrame) -> EncodedEvents:
        """Turn an events frame into what this store's bulk path sends (no database access).

        The ingest job calls this on its parsing thread, so the writer thread only writes.
        SQLite: one Python list per column that has a value (all-null columns are left to their
        default), zipped lazily into rows for executemany. PostgreSQL: the batch as CSV text made
        by polars, sent as it is through COPY: no Python object per row or value.
        """
        frame = frame.select(list(EVENT_COLUMNS))
        if frame.height == 0:
            return EncodedEvents(0, [], [])
        # PostgreSQL text cannot hold NUL: both stores keep the escape the parsers use for bytes that
        # are not text, so the same line reads back the same from either.
        texts = [c for c, kind in EVENT_COLUMNS.items() if kind == "str"]
        with_nul = [c for c in texts if frame[c].str.contains("\x00", literal=True).any()]
        if with_nul:
            frame = frame.with_columns(pl.col(with_nul).str.replace_all("\x00", "\\x00", literal=True))
        if self.dialect == "postgresql":
            csv = frame.write_csv(include_header=False, datetime_format="%Y-%m-%d %H:%M:%S%.6f%z", null_value="")
            return EncodedEvents(frame.height, list(EVENT_COLUMNS), [], csv.encode())
        names: list[str] = []
        columns: list[list[Any]] = []
        for name in EVENT_COLUMNS:
            series = frame[name]
            if series.null_count() == frame.height:
                continue
            if name == "ts":
                # SQLAlchemy's SQLite DateTime format, so Core queries read what the fast path wrote.
                series = series.dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%d %H:%M:%S.%6f")
            names.append(name)
            columns.append(series.to_list())
        return EncodedEvents(frame.height, names, columns)

    def write_batch(
        self,
        frame: pl.DataFrame | EncodedEvents,
        quarantined: Sequence[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> WriteResult:
        """Insert events (ignoring ids already stored), quarantine rows and the checkpoint, atomically."""
        encoded = frame if isinstance(frame, EncodedEvents) else self.encode_events(frame)
        now = datetime.now(timezone.utc)
        raw = self.engine.raw_connection()
        try:
            if self.dialect == "sqlite":
                inserted = self._sqlite_events(raw, encoded)
            elif self.dialect == "postgresql":
                inserted = self._pg_events(raw, encoded)
            else:
                raise StoreError(f"unsupported database dialect {self.dialect}")
            n_quarantined = self._write_quarantine(raw, quarantined, now)
            if checkpoint is not None:
                self._write_checkpoint(raw, checkpoint, now)
            raw.commit()
        except Exception as exc:
            raw.rollback()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"writing a batch failed: {_first_line(exc)}") from exc
        finally:
            raw.close()
        return WriteResult(inserted, encoded.height - inserted, n_quarantined)

    def _sqlite_events(self, raw: Any, encoded: EncodedEvents) -> int:
        if encoded.height == 0:
            return 0
        cols = ", ".join(encoded.names)
        marks = ", ".join("?" for _ in encoded.names)
        cur = raw.cursor()
        before = raw.total_changes
        # Row tuples are zipped on the fly: no list of a batch's rows is ever built.
        cur.executemany(f"INSERT OR IGNORE INTO events ({cols}) VALUES ({marks})", zip(*encoded.columns))
        inserted = raw.total_changes - before
        cur.close()
        return inserted

    # ---- bulk loads ----------------------------------------------------------------------------
    def secondary_event_indexes(self) -> list[sa.Index]:
        """The events indexes a bulk load builds once at its end: those keyed by entity.

        The time index stays: events arrive roughly in time order, so its inserts are appends.
        """
        return sorted((ix for ix in events.indexes if ix.name != "ix_events_ts"), key=lambda ix: ix.name)

    def has_at_least(self, rows: int) -> bool:
        """Whether `events` holds `rows` events or more, without counting further than that."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                # The largest rowid bounds the count from above: one B-tree descent.
                top = conn.execute(sa.text("SELECT coalesce(max(rowid), 0) FROM events")).scalar_one()
                return int(top) >= rows
            found = conn.execute(sa.text("SELECT count(*) FROM (SELECT 1 FROM events LIMIT :n) AS s"), {"n": rows})
            return int(found.scalar_one()) >= rows

    def drop_secondary_indexes(self) -> None:
        """Drop the entity indexes of events for a bulk load; `ensure_indexes` builds them back.

        Inserting into indexes keyed by IP, account and key touches a random page of each per
        row, and every commit writes those pages to the log again (SQLite's WAL; PostgreSQL's
        full-page images): more than half the cost of a big load. Building them once after the
        load is a sort. Events, ids and checkpoints are untouched, so exactly-once holds; a load
        killed half way leaves the indexes to the next `Store.open` (or ingest), which builds any
        that are missing. Meanwhile queries by entity are slower, never wrong.
        """
        with self.engine.begin() as conn:
            for ix in self.secondary_event_indexes():
                conn.execute(sa.text(f"DROP INDEX IF EXISTS {ix.name}"))

    def ensure_indexes(self) -> None:
        """Create any event index that a bulk load dropped (a no-op when all are there)."""
        wanted = self.secondary_event_indexes()
        with self.engine.begin() as conn:
            # Looked up first: CREATE INDEX IF NOT EXISTS would still wait for running writers.
            if self.dialect == "sqlite":
                present = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
            else:
                present = {r[0] for r in conn.exec_driver_sql(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'events' AND schemaname = current_schema()"
                )}
            missing = [ix for ix in wanted if ix.name not in present]
            if not missing:
                return
            if self.dialect == "sqlite":
                # A helper thread sorts; the sort spills to a temporary file rather than memory, so
                # building over 10 million events keeps memory flat.
                conn.exec_driver_sql("PRAGMA threads=2")
                conn.exec_driver_sql("PRAGMA temp_store=FILE")
            else:
                conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            try:
                for ix in missing:
                    conn.execute(sa.schema.CreateIndex(ix, if_not_exists=True))
            finally:
                if self.dialect == "sqlite":
                    conn.exec_driver_sql("PRAGMA temp_store=MEMORY")

    def _pg_events(self, raw: Any, encoded: EncodedEvents) -> int:
        if encoded.height == 0:
            return 0
        import psycopg

        conn = raw.driver_connection
        cols = ", ".join(EVENT_COLUMNS)
        with conn.cursor() as cur:
            # Exactly-once rests on the checkpoint committing with its events, not on this flush:
            # a commit lost in a server crash takes its checkpoint with it and the lines are read
            # again (the same trade-off as SQLite's synchronous=NORMAL in WAL mode).
            cur.execute("SET LOCAL synchronous_commit = off")
            # Fast path: COPY straight into events. Lines past a checkpoint are new, so a
            # duplicate id is rare (a replayed stdin or push); then the batch goes the slow way,
            # through a staging table and ON CONFLICT DO NOTHING.
            cur.execute("SAVEPOINT mw_events_copy")
            try:
                # CSV: an unquoted empty field is NULL, a quoted one ("") the empty string.
                with cur.copy(f"COPY events ({cols}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(encoded.csv)
                cur.execute("RELEASE SAVEPOINT mw_events_copy")
                return encoded.height
            except psycopg.errors.UniqueViolation:
                cur.execute("ROLLBACK TO SAVEPOINT mw_events_copy")
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS events_staging (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY events_staging ({cols}) FROM STDIN (FORMAT csv)") as copy:
                copy.write(encoded.csv)
            cur.execute(
                f"INSERT INTO events ({cols}) SELECT DISTINCT ON (event_id) {cols} FROM events_staging "
                # No conflict target: on the day-partitioned table the key is (event_id, ts).
                "ON CONFLICT DO NOTHING"
            )
            inserted = cur.rowcount
        return inserted

    def _write_quarantine(self, raw: Any, rows: Sequence[dict[str, Any]], now: datetime) -> int:
        if not rows:
            return 0
        params = [
            (
                r["quarantine_id"],
                r["source"],
                r["source_key"],
                r["line_no"],
                r["byte_offset"],
                r["parser"],
                r["reason"][:1000],
                r["raw"][:QUARANTINE_RAW_LIMIT].replace("\x00", "\\x00"),
                self._ts_param(now),
            )
            for r in rows
        ]
        cur = raw.cursor()
        if self.dialect == "sqlite":
            sql = (
                "INSERT OR IGNORE INTO quarantine (quarantine_id, source, source_key, line_no, byte_offset, "
                "parser, reason, raw, received_at) VALUES (?,?,?,?,?,?,?,?,?)"
            )
        else:
            sql = (
                "INSERT INTO quarantine (quarantine_id, source, source_key, line_no, byte_offset, parser, "
                "reason, raw, received_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING"
            )
        cur.executemany(sql, params)
        cur.close()
        return len(rows)

    def _write_checkpoint(self, raw: Any, cp: Checkpoint, now: datetime) -> None:
        mark = "?" if self.dialect == "sqlite" else "%s"
        marks = ", ".join([mark] * 10)
        sql = (
            "INSERT INTO checkpoints (source_key, path, dev, inode, first_line_hash, byte_offset, line_no, "
            f"updated_at, probe_len, probe_hash) VALUES ({marks}) ON CONFLICT (source_key) DO UPDATE SET path = excluded.path, "
            "dev = excluded.dev, inode = excluded.inode, byte_offset = excluded.byte_offset, "
            "line_no = excluded.line_no, updated_at = excluded.updated_at "
            "WHERE excluded.byte_offset >= checkpoints.byte_offset"
        )
        cur = raw.cursor()
        cur.execute(
            sql,
            (cp.source_key, cp.path, cp.dev, cp.inode, cp.first_line_hash, cp.byte_offset, cp.line_no,
             self._ts_param(now), cp.probe_len, cp.probe_hash),
        )
        cur.close()

    def _ts_param(self, value: datetime) -> Any:
        if self.dialect == "sqlite":
            return _utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")
        return _utc(value)

    # ---- reads -------------------------------------------------------------------------------
    def count_events(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()

    def event_time_range(self) -> tuple[datetime, datetime] | None:
        """The first and last event times, each read from one end of the `ts` index.

        One query asking for min() and max() together makes SQLite scan the whole table (0.45 s
        with a million events); two ordered LIMIT 1 reads take a few milliseconds on both stores.
        """
        with self.read_engine.connect() as conn:
            lo = conn.execute(sa.select(events.c.ts).order_by(events.c.ts).limit(1)).scalar()
            if lo is None:
                return None
            hi = conn.execute(sa.select(events.c.ts).order_by(events.c.ts.desc()).limit(1)).scalar()
        return _utc(_as_datetime(lo)), _utc(_as_datetime(hi))

    def load_events(self, since: datetime, until: datetime, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Events with since <= ts <= until as a typed pandas frame (the detectors' input)."""
        cols = list(columns) if columns else list(EVENT_COLUMNS)
        query = (
            sa.select(*[events.c[c] for c in cols])
            .where(events.c.ts >= _utc(since), events.c.ts <= _utc(until))
            .order_by(events.c.ts, events.c.event_id)
        )
        with self.read_engine.connect() as conn:
            result = conn.execute(query)
            frame = pd.DataFrame(result.fetchall(), columns=cols)
        return to_event_frame(frame, cols)

    def quarantine_summary(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(quarantine.c.reason, sa.func.count()).group_by(quarantine.c.reason)
            ).all()
        return {reason: count for reason, count in rows}

    def count_quarantine(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar_one()

    # ---- job watermarks -----------------------------------------------------------------------
    def get_watermark(self, job: str) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(job_state.c.watermark).where(job_state.c.job == job)).scalar()
        return _utc(_as_datetime(value)) if value is not None else None

    def set_watermark(self, job: str, watermark: datetime) -> None:
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            updated = conn.execute(
                job_state.update().where(job_state.c.job == job).values(watermark=_utc(watermark), updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(job_state.insert().values(job=job, watermark=_utc(watermark), updated_at=now))

    # ---- alerts ------------------------------------------------------------------------------
    def upsert_alerts(self, found: Sequence[Alert]) -> tuple[int, int]:
        """Insert new alerts, refresh existing ones (same id) without touching their status.

        Returns (new, updated).
        """
        if not found:
            return 0, 0
        now = datetime.now(timezone.utc)
        new = updated = 0
        with self.engine.begin() as conn:
            existing = {
                r.alert_id
                for r in conn.execute(
                    sa.select(alerts.c.alert_id).where(alerts.c.alert_id.in_([a.alert_id for a in found]))
                )
            }
            for alert in found:
                row = alert.to_row()
                row["window_start"] = _utc(row["window_start"])
                row["window_end"] = _utc(row["window_end"])
                if row["alert_id"] in existing:
                    changes = {k: row[k] for k in ("window_end", "score", "title", "evidence", "severity")}
                    conn.execute(
                        alerts.update().where(alerts.c.alert_id == row["alert_id"]).values(**changes, updated_at=now)
                    )
                    updated += 1
                else:
                    conn.execute(alerts.insert().values(**row, created_at=now, updated_at=now))
                    new += 1
        return new, updated

    def list_alerts(self, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = sa.select(alerts).order_by(alerts.c.severity.desc(), alerts.c.window_start.desc()).limit(limit)
        if status:
            query = query.where(alerts.c.status == status)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            row["evidence"] = json.loads(row["evidence"])
            row["window_start"] = _utc(row["window_start"])
            row["window_end"] = _utc(row["window_end"])
        return rows


def to_event_frame(frame: pd.DataFrame, cols: Sequence[str] | None = None) -> pd.DataFrame:
    """Cast a frame to the declared event dtypes (UTC timestamps, nullable ints and strings)."""
    dtypes = pandas_dtypes()
    cols = list(cols) if cols else list(frame.columns)
    out = {}
    for c in cols:
        series = frame[c] if c in frame.columns else pd.Series([None] * len(frame))
        if c == "ts":
            out[c] = pd.to_datetime(series, utc=True, format="mixed").astype(dtypes[c])
        else:
            out[c] = series.astype(dtypes[c])
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
