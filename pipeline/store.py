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

from pipeline.schema import EVENT_COLUMNS, Alert, StoreError, pandas_dtypes

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
class WriteResult:
    inserted: int
    duplicates: int
    quarantined: int


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def make_engine(url: str) -> Engine:
    """Engine with SQLite tuned for bulk writes (WAL) or PostgreSQL with pre-ping."""
    try:
        if url.startswith("sqlite"):
            db_path = sa.engine.make_url(url).database
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
    cur.execute("PRAGMA cache_size=-262144")  # 256 MiB: index pages of a big batch stay in memory
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def redact_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"


class Store:
    """All database access of the pipeline goes through here."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def open(cls, url: str, upgrade: bool = True) -> Store:
        store = cls(make_engine(url))
        if upgrade:
            store.upgrade()
        return store

    def upgrade(self) -> None:
        from pipeline.migrations import upgrade_to_head

        try:
            upgrade_to_head(self.engine)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open store {redact_url(str(self.engine.url))}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()

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

    # ---- bulk writes -------------------------------------------------------------------------
    def write_batch(
        self,
        frame: pl.DataFrame,
        quarantined: Sequence[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> WriteResult:
        """Insert events (ignoring ids already stored), quarantine rows and the checkpoint, atomically."""
        frame = frame.select(list(EVENT_COLUMNS))
        now = datetime.now(timezone.utc)
        raw = self.engine.raw_connection()
        try:
            if self.dialect == "sqlite":
                inserted = self._sqlite_events(raw, frame)
            elif self.dialect == "postgresql":
                inserted = self._pg_events(raw, frame)
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
        return WriteResult(inserted, frame.height - inserted, n_quarantined)

    def _sqlite_events(self, raw: Any, frame: pl.DataFrame) -> int:
        if frame.height == 0:
            return 0
        # SQLAlchemy's SQLite DateTime format, so Core queries read what the fast path wrote.
        rows = frame.with_columns(pl.col("ts").dt.convert_time_zone("UTC").dt.strftime("%Y-%m-%d %H:%M:%S.%6f")).rows()
        cols = ", ".join(EVENT_COLUMNS)
        marks = ", ".join("?" for _ in EVENT_COLUMNS)
        cur = raw.cursor()
        before = raw.total_changes
        cur.executemany(f"INSERT OR IGNORE INTO events ({cols}) VALUES ({marks})", rows)
        inserted = raw.total_changes - before
        cur.close()
        return inserted

    def _pg_events(self, raw: Any, frame: pl.DataFrame) -> int:
        if frame.height == 0:
            return 0
        conn = raw.driver_connection
        cols = ", ".join(EVENT_COLUMNS)
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS events_staging (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY events_staging ({cols}) FROM STDIN") as copy:
                for row in frame.iter_rows():
                    copy.write_row(row)
            cur.execute(
                f"INSERT INTO events ({cols}) SELECT DISTINCT ON (event_id) {cols} FROM events_staging "
                "ON CONFLICT (event_id) DO NOTHING"
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
        with self.engine.connect() as conn:
            lo, hi = conn.execute(sa.select(sa.func.min(events.c.ts), sa.func.max(events.c.ts))).one()
        if lo is None:
            return None
        return _utc(_as_datetime(lo)), _utc(_as_datetime(hi))

    def load_events(self, since: datetime, until: datetime, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """Events with since <= ts <= until as a typed pandas frame (the detectors' input)."""
        cols = list(columns) if columns else list(EVENT_COLUMNS)
        query = (
            sa.select(*[events.c[c] for c in cols])
            .where(events.c.ts >= _utc(since), events.c.ts <= _utc(until))
            .order_by(events.c.ts, events.c.event_id)
        )
        with self.engine.connect() as conn:
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
