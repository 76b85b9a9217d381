"""The jobs that wire stages together: ingest (sources -> parsers -> store) and detect (store -> alerts)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import sqlalchemy as sa

from pipeline.config import Settings
from pipeline.parsers import PARSERS, ParseContext, Parser, _load_builtin
from pipeline.parsers.auto import sniff_format
from pipeline.parsers.base import MAX_YEAR, MIN_YEAR, empty_events
from pipeline.privacy import fingerprint, redact_texts
from pipeline.schema import (
    EVENT_COLUMNS,
    Alert,
    AlertStatus,
    ConfigError,
    Severity,
    StoreError,
    event_id_expr,
    event_ids,
    pandas_dtypes,
    polars_schema,
)
from pipeline.sources import (
    LineBatch,
    expand_paths,
    follow_batches,
    identify,
    read_batches,
    read_prefix,
    read_stdin_batches,
)
from pipeline.sources.lines import GZIP_MAGIC
from pipeline.store import Checkpoint, Store, clip_range

log = logging.getLogger(__name__)

STDIN = "-"
# How many lines `auto` looks at before choosing a format for a file.
SNIFF_LINES = 200
UNRECOGNISED = "unrecognised format: no parser recognises the first lines of this file"
# Bytes of a file's start remembered with its checkpoint, to recognise a rotated copy of it.
PROBE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceKey:
    """The identity events of one file are stored under, and the probe saved with its checkpoint."""

    key: str
    probe_len: int | None
    probe_hash: str | None


def resolve_source(store: Store, path: str, identity: Any) -> tuple[SourceKey, Checkpoint | None]:
    """Content identity, unless another file merely shares the first line (fail2ban's test files do).

    A file is known by the hash of its first line, so its renamed and compressed rotations resume
    where it stopped. When a checkpoint for that hash belongs to another inode, the first bytes
    decide: the same bytes make it a copy (resume), different bytes a stranger with the same first
    line (it gets a key of its own, so none of its events is mistaken for a duplicate).
    """
    cp = store.get_checkpoint(identity.key)
    key = identity.key
    if cp is not None and (cp.dev, cp.inode) != (identity.dev, identity.inode) and cp.probe_hash:
        if _sha(read_prefix(path, cp.probe_len or 0)) != cp.probe_hash:
            key = hashlib.sha256(f"{identity.key}:{identity.dev}:{identity.inode}".encode()).hexdigest()[:32]
            cp = store.get_checkpoint(key)
    if cp is not None and cp.probe_hash:
        return SourceKey(key, cp.probe_len, cp.probe_hash), cp
    head = read_prefix(path, PROBE_BYTES)
    return SourceKey(key, len(head), _sha(head)), cp


def reopen_unterminated_tail(store: Store, path: str, source_key: str, cp: Checkpoint | None) -> Checkpoint | None:
    """The checkpoint to resume from, moved back to the start of the last line read when that line
    had no terminator yet and the file has grown since (its writer was mid-line when it was read).

    A finished file's last line is read even without a newline; if more bytes arrive after it, the
    line it was part of is read again whole, replacing what was stored for its first part, instead of
    its rest being stored as a line of its own. The byte before a checkpoint is a newline unless the
    last line read was unterminated, so one byte tells.
    """
    if cp is None or cp.byte_offset <= 0:
        return cp
    try:
        with open(path, "rb") as f:
            if f.read(2) == GZIP_MAGIC or os.fstat(f.fileno()).st_size <= cp.byte_offset:
                return cp  # a gzip is a finished file; an unchanged file has nothing to repair
            f.seek(cp.byte_offset - 1)
            if f.read(1) in (b"\n", b"\r"):  # a bare CR ends a line too (old Mac files)
                return cp
            start = _line_start(f, cp.byte_offset - 1)
    except OSError:
        return cp  # the read that follows reports an unreadable file
    line_no = max(cp.line_no - 1, 1)
    if not store.rewind_checkpoint(source_key, cp.byte_offset, start, line_no, event_ids(source_key, [start])[0]):
        return store.get_checkpoint(source_key)  # another worker moved it meanwhile
    log.info("%s: its last line was read before it was finished; reading it again from byte %d", path, start)
    return dataclasses.replace(cp, byte_offset=start, line_no=line_no)


def _line_start(f: Any, pos: int, chunk: int = 64 << 10) -> int:
    """Offset of the start of the line holding byte `pos` (after the previous newline, or 0)."""
    end = pos
    while end > 0:
        begin = max(0, end - chunk)
        f.seek(begin)
        block = f.read(end - begin)
        found = max(block.rfind(b"\n"), block.rfind(b"\r"))
        if found >= 0:
            return begin + found + 1
        end = begin
    return 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class IngestSummary:
    files: int = 0
    files_skipped: int = 0
    lines_read: int = 0
    events_stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # Files read before, to their end: nothing new in them this time.
    unchanged: list[str] = field(default_factory=list)
    # --reread: what the earlier reads of the files had stored, removed before reading them again.
    forgotten_events: int = 0
    forgotten_quarantined: int = 0

    def count_format(self, parser: Any, name: str) -> None:
        """One more source read as `name` (or none recognised)."""
        self.formats[name if parser else "unrecognised"] += 1

    @property
    def lines_per_second(self) -> float:
        return self.lines_read / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: IngestSummary) -> None:
        for name in ("files", "files_skipped", "lines_read", "events_stored", "duplicates", "quarantined",
                     "forgotten_events", "forgotten_quarantined"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unchanged.extend(other.unchanged)
        self.reasons.update(other.reasons)
        self.formats.update(other.formats)


def parse_context(settings: Settings, reference_time: datetime | None = None) -> ParseContext:
    return ParseContext(
        pepper=settings.resolved_pepper(),
        trusted_proxies=tuple(settings.trusted_proxies),
        timezone=settings.timezone,
        reference_time=reference_time or datetime.now(timezone.utc),
        log_format=settings.log_format,
        json_mapping=settings.json_mapping,
    )


def make_parser(name: str, ctx: ParseContext) -> Parser:
    _load_builtin()
    if name not in PARSERS:
        known = ", ".join(sorted([*PARSERS, "auto"]))
        raise ConfigError(f"unknown format {name!r} (known: {known})")
    return PARSERS[name](ctx)


class BatchIngester:
    """Parses batches and writes them, overlapping the parse of batch n+1 with the write of batch n."""

    def __init__(self, store: Store, summary: IngestSummary):
        self.store = store
        self.summary = summary
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailwarden-writer")
        self._pending: Future | None = None

    def submit(self, batch: LineBatch, parser: Parser | None, parser_name: str, source: SourceKey | None) -> None:
        """Queue a batch; with a `source` its checkpoint commits in the same transaction."""
        frame, quarantined = prepare_batch(batch, parser, parser_name, source.key if source else batch.identity.key)
        cp = None
        if source is not None:
            ident = batch.identity
            cp = Checkpoint(
                source.key, batch.path, ident.dev, ident.inode, ident.first_line_hash, batch.end_offset,
                batch.next_line_no, source.probe_len, source.probe_hash,
            )
        self.wait()
        self.summary.lines_read += len(batch.lines)
        self.summary.reasons.update(q["reason"] for q in quarantined)
        # Encoding (Store.encode_events) stays on the writer thread: done on the parsing thread it
        # stalled the scheduled detect job of `mailwarden run` (tests/integration/test_service_run.py).
        self._pending = self._writer.submit(self.store.write_batch, frame, quarantined, cp)

    def wait(self) -> None:
        if self._pending is not None:
            result = self._pending.result()
            self._pending = None
            self.summary.events_stored += result.inserted
            self.summary.duplicates += result.duplicates
            self.summary.quarantined += result.quarantined

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)


def prepare_batch(
    batch: LineBatch, parser: Parser | None, parser_name: str, source_key: str | None = None
) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Parse one batch into store-ready events and quarantine rows (every line ends in one)."""
    source_key = source_key or batch.identity.key
    if parser is None:
        rejected = [(i, UNRECOGNISED) for i in range(len(batch.lines))]
        frame = None
    else:
        try:
            parsed = parser.parse(batch.lines)
            frame, rejected = parsed.events, parsed.rejected
        except Exception as exc:  # a parser bug must not lose lines: they go to quarantine
            frame, rejected = None, [(i, f"parser error: {type(exc).__name__}: {exc}") for i in range(len(batch.lines))]
    if frame is not None and frame.height:
        offsets = pl.Series("offset", batch.offsets, dtype=pl.Int64)
        frame = frame.with_columns(offsets.gather(frame["row"]).alias("_offset")).with_columns(
            event_id_expr(source_key, pl.col("_offset")).alias("event_id"),
            (pl.lit(f"{batch.path}:") + pl.col("_offset").cast(pl.String)).alias("origin"),
        ).drop("_offset")
        # An event needs a time within MIN_YEAR..MAX_YEAR; a parser that gave none (or one out of
        # those years, whatever the format) has in effect rejected the line.
        year = pl.col("ts").dt.year()
        unusable = frame.filter(pl.col("ts").is_null() | (year < MIN_YEAR) | (year >= MAX_YEAR))
        if unusable.height:
            # One wording per cause (the summary counts lines by reason); the raw line has the date.
            out_of_range = f"timestamp outside the years {MIN_YEAR}-{MAX_YEAR - 1}"
            rejected = [*rejected, *(
                (r, "no timestamp" if ts is None else out_of_range)
                for r, ts in zip(unusable["row"].to_list(), unusable["ts"].to_list())
            )]
            frame = frame.filter(pl.col("ts").is_not_null() & (year >= MIN_YEAR) & (year < MAX_YEAR))
    else:
        frame = empty_events().with_columns(
            pl.lit(None, pl.String).alias("event_id"), pl.lit(None, pl.String).alias("origin")
        )
    raw_lines = redact_texts([batch.lines[r] for r, _ in rejected])
    ids = event_ids(source_key, [batch.offsets[r] for r, _ in rejected])
    quarantined = [
        {
            "quarantine_id": qid,
            "source": batch.path,
            "source_key": source_key,
            "line_no": batch.line_numbers[r],
            "byte_offset": batch.offsets[r],
            "parser": parser_name,
            "reason": reason,
            "raw": raw,
        }
        for (r, reason), raw, qid in zip(rejected, raw_lines, ids)
    ]
    return frame.drop("row"), quarantined


def _sample_lines(path: str) -> list[str]:
    sample: list[str] = []
    for batch in read_batches(path, batch_lines=SNIFF_LINES, quiet=True):
        sample.extend(batch.lines)
        break
    return sample[:SNIFF_LINES]


def _file_reference_time(path: str) -> datetime:
    # Syslog lines have no year: they are assumed to precede the file's last modification.
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc)
    except OSError:
        return datetime.now(timezone.utc)


def choose_parser(fmt: str, sample: list[str], settings: Settings, ref: datetime) -> tuple[Parser | None, str]:
    ctx = parse_context(settings, ref)
    if fmt != "auto":
        return make_parser(fmt, ctx), fmt
    name, _share = sniff_format(sample)
    if name is None:
        return None, "auto"
    return make_parser(name, ctx), name


ProgressHook = Callable[[str, int, int], None]  # (path, bytes done, bytes total)


def ingest_paths(
    store: Store,
    settings: Settings,
    patterns: list[str],
    fmt: str = "auto",
    progress: ProgressHook | None = None,
    reread: bool = False,
) -> IngestSummary:
    """Read each file from its checkpoint to its end, exactly once across restarts.

    `reread`: first remove what earlier reads of each file stored (its events, quarantined lines
    and checkpoint), then read it from the start, as after a first read with the wrong format.
    """
    started = time.perf_counter()
    summary = IngestSummary()
    if fmt != "auto":
        make_parser(fmt, parse_context(settings))  # fail fast on an unknown format
    bulk = _bulk_load_worthwhile(store, patterns)
    if bulk:
        store.drop_secondary_indexes()
    ingester = BatchIngester(store, summary)
    try:
        for pattern in patterns:
            if pattern == STDIN:
                _ingest_stdin(ingester, settings, fmt, summary)
                continue
            for path in expand_paths([pattern]):
                _ingest_file(ingester, store, settings, path, fmt, summary, progress, reread)
    finally:
        try:
            ingester.close()
        finally:
            if bulk:
                store.ensure_indexes()
    summary.seconds = time.perf_counter() - started
    return summary


# Bulk-load mode (secondary indexes built once at the end, see Store.drop_secondary_indexes) pays
# off when the input is big and at least as large as what is stored: rebuilding sorts the whole
# table, so a small file appended to a big store keeps the indexes. Bytes per line of a typical
# access log turn file sizes into an estimate of lines.
BULK_MIN_BYTES = 32 << 20
BULK_BYTES_PER_LINE = 120


def _bulk_load_worthwhile(store: Store, patterns: list[str]) -> bool:
    try:
        pending = sum(_size_hint(p) for p in expand_paths([p for p in patterns if p != STDIN]))
    except ConfigError:
        return False  # the loop below reports the pattern that matches nothing
    if pending < BULK_MIN_BYTES:
        return False
    return not store.has_at_least(pending // BULK_BYTES_PER_LINE)


def _ingest_file(
    ingester: BatchIngester,
    store: Store,
    settings: Settings,
    path: str,
    fmt: str,
    summary: IngestSummary,
    progress: ProgressHook | None,
    reread: bool = False,
) -> None:
    identity = identify(path)
    summary.files += 1
    if identity is None:
        summary.files_skipped += 1
        return
    ingester.wait()  # the previous file's checkpoint must be visible to tell the two apart
    source, cp = resolve_source(store, path, identity)
    if reread and cp is not None:
        gone, bad = store.forget_source(source.key)
        summary.forgotten_events += gone
        summary.forgotten_quarantined += bad
        cp = None
    cp = reopen_unterminated_tail(store, path, source.key, cp)
    start, line_no = (cp.byte_offset, cp.line_no) if cp else (0, 1)
    parser, name = choose_parser(fmt, _sample_lines(path), settings, _file_reference_time(path))
    summary.count_format(parser, name)
    total = _size_hint(path)
    batches = 0
    for batch in read_batches(path, start_offset=start, start_line=line_no, batch_lines=settings.batch_lines):
        batches += 1
        ingester.submit(batch, parser, name, source)
        if progress:
            progress(path, batch.end_offset, total)
    if cp is not None and not batches:
        summary.unchanged.append(path)
    if progress:
        progress(path, total, total)


def _size_hint(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _ingest_stdin(ingester: BatchIngester, settings: Settings, fmt: str, summary: IngestSummary) -> None:
    summary.files += 1
    parser: Parser | None = None
    name = fmt
    for batch in read_stdin_batches(batch_lines=settings.batch_lines):
        if parser is None and name == fmt:
            parser, name = choose_parser(fmt, batch.lines[:SNIFF_LINES], settings, datetime.now(timezone.utc))
            summary.count_format(parser, name)
        # stdin cannot be re-read from an offset, so it keeps no checkpoint; ids still dedupe a replay.
        ingester.submit(batch, parser, name, None)


# Prefix of a follower thread's name; the rest is the path it follows.
FOLLOWER_PREFIX = "follow:"


def follow_paths(
    store: Store,
    settings: Settings,
    paths: list[str],
    fmt: str,
    stop: threading.Event,
    on_batch: Callable[[IngestSummary], None] | None = None,
) -> IngestSummary:
    """Keep ingesting appended lines (through rotation) until `stop` is set."""
    summary = IngestSummary()
    started = time.perf_counter()
    parsers: dict[str, tuple[Parser | None, str]] = {}

    def run(path: str) -> None:
        sources: dict[str, SourceKey] = {}

        def checkpoint_of(identity: Any) -> tuple[int, int] | None:
            source, cp = resolve_source(store, path, identity)
            cp = reopen_unterminated_tail(store, path, source.key, cp)
            sources[identity.key] = source
            return (cp.byte_offset, cp.line_no) if cp else None

        ingester = BatchIngester(store, summary)
        try:
            for batch in follow_batches(path, checkpoint_of, stop, batch_lines=settings.batch_lines):
                key = batch.identity.key
                if key not in parsers:
                    parsers[key] = choose_parser(fmt, batch.lines[:SNIFF_LINES], settings, datetime.now(timezone.utc))
                    summary.count_format(*parsers[key])
                parser, name = parsers[key]
                source = sources.get(key) or resolve_source(store, path, batch.identity)[0]
                ingester.submit(batch, parser, name, source)
                ingester.wait()
                if on_batch:
                    on_batch(summary)
        finally:
            ingester.close()

    # Named after the file, so a thread that dies says which file it was following.
    threads = [threading.Thread(target=run, args=(p,), name=f"{FOLLOWER_PREFIX}{p}", daemon=True) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary.files = len(paths)
    summary.seconds = time.perf_counter() - started
    return summary


# ---- detection -------------------------------------------------------------------------------

# The detect job's own tables (migration 0004). Declared here, on their own metadata, because only
# the detection jobs and their CLI read or write them.
_detect_metadata = sa.MetaData()
revoked_keys = sa.Table(
    "revoked_keys",
    _detect_metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("note", sa.Text),
)
trained_models = sa.Table(
    "models",
    _detect_metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("features", sa.Text, nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("sklearn_version", sa.String(32), nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("trained_from", sa.DateTime(timezone=True)),
    sa.Column("trained_to", sa.DateTime(timezone=True)),
    sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=False),
)

# What `fingerprint()` and the parsers store in `api_key_id` (as detectors.allowlist reads it).
_STORED_KEY = re.compile(r"^(?:[0-9a-f]{20}|id:.+)$")
# Columns the detectors read: everything but `origin` (evidence points back through event ids).
DETECT_COLUMNS = [c for c in EVENT_COLUMNS if c != "origin"]
# How much data one load brings into memory; longer replays load in pieces of this size.
LOAD_SPAN = timedelta(days=7)
# The detect job replays history in steps of a day, each with every detector's lookback before it
# (detectors.rules.REPLAY_STEP holds the detectors to this).
DETECT_STEP = timedelta(days=1)


@dataclass
class DetectSummary:
    since: datetime | None
    until: datetime | None
    events: int = 0
    alerts_found: int = 0
    alerts_new: int = 0
    alerts_updated: int = 0
    by_detector: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    load_seconds: float = 0.0
    seconds_by_detector: Counter = field(default_factory=Counter)
    alerts: list[Alert] = field(default_factory=list)


def _steps(since: datetime, until: datetime, step: timedelta) -> Iterator[tuple[datetime, datetime]]:
    start = since
    while start < until:
        end = min(start + step, until)
        yield start, end
        start = end
    if since == until:
        yield since, until


def key_id_of(value: str, pepper: bytes) -> str:
    """The id an API key is stored under: fingerprints and `id:` values as given, raw keys
    fingerprinted (the raw key is never kept)."""
    value = value.strip()
    return value if _STORED_KEY.match(value) else fingerprint(value, pepper)


def read_revocation_file(path: str | os.PathLike[str]) -> list[tuple[str, datetime | None]]:
    """Lines `KEY [TIME]` (raw key or fingerprint, optional ISO-8601 revocation time); blank lines
    and `#` comments are skipped. A bad line is a ConfigError naming file and line."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read revocation file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"{path}:{number}: expected `KEY [TIME]`, got {len(parts)} fields")
        at = parse_time(parts[1], f"{path}:{number}") if len(parts) == 2 else None
        entries.append((parts[0], at))
    return entries


def parse_time(value: str, where: str) -> datetime:
    """ISO-8601 (a trailing Z allowed) as an aware UTC datetime; naive times are UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an ISO-8601 time (e.g. 2026-11-30T14:00:00Z)") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def revoke_keys(store: Store, entries: list[tuple[str, datetime | None]], pepper: bytes, note: str | None = None) -> int:
    """Put keys on the revocation list (an existing entry takes the new time). Returns how many."""
    now = datetime.now(timezone.utc)
    rows = {key_id_of(key, pepper): at for key, at in entries}
    with store.engine.begin() as conn:
        existing = {r[0] for r in conn.execute(sa.select(revoked_keys.c.key_id).where(revoked_keys.c.key_id.in_(list(rows))))}
        for key_id, at in rows.items():
            if key_id in existing:
                conn.execute(revoked_keys.update().where(revoked_keys.c.key_id == key_id).values(revoked_at=at, note=note))
            else:
                conn.execute(revoked_keys.insert().values(key_id=key_id, revoked_at=at, added_at=now, note=note))
    return len(rows)


def load_revoked(store: Store) -> dict[str, datetime | None]:
    """The revocation list: key fingerprint -> from when presenting it is a finding (None: always)."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(revoked_keys.c.key_id, revoked_keys.c.revoked_at)).all()
    return {key: (_aware(at) if at is not None else None) for key, at in rows}


def _aware(value: Any) -> datetime:
    value = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def load_frame(store: Store, since: datetime, until: datetime, where: Any = None) -> pd.DataFrame:
    """Events with since <= ts <= until as the detectors' frame, sorted by (ts, event_id); with
    `where` (a SQLAlchemy condition on `events`, or a list of them whose rows are told apart, see
    _candidate_frames) only the rows it selects.

    Columnar where it counts (blocks of raw sqlite3 rows into typed polars columns; COPY from
    PostgreSQL): SQLAlchemy's per-row work cost ten times what the whole detector pack does.
    """
    parts = where if isinstance(where, list) else [where]
    frames: list[pl.DataFrame] = []
    for part in parts:
        frame: pl.DataFrame | None = None
        sql = _where_sql(store, part) if part is not None else None
        if store.dialect == "sqlite":
            frame = _sqlite_frame(store, since, until, sql)
        elif store.dialect == "postgresql":
            frame = _pg_frame(store, since, until, sql)
        if frame is None:
            if part is not None:
                raise StoreError(f"cannot load selected rows from a {store.dialect} store")
            return store.load_events(since, until)
        frames.append(frame)
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)
    return _to_pandas(frame.sort(["ts", "event_id"]))


def _where_sql(store: Store, condition: Any) -> str:
    """A condition as SQL text with its values inlined, for the raw sqlite3 and COPY readers.

    Compiled with the named paramstyle so a `%` in a LIKE pattern is not doubled for psycopg.
    """
    dialect = type(store.engine.dialect)(paramstyle="named")
    return str(condition.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _sqlite_frame(store: Store, since: datetime, until: datetime, where: str | None = None) -> pl.DataFrame | None:
    """The detection columns of a range, read through the store's own stdlib sqlite3 connection.

    Rows are fetched in blocks and turned into typed polars columns, skipping SQLAlchemy's
    per-row work. Deliberately not through a second SQLite library (an ADBC driver bundles its
    own): two copies of SQLite in one process do not see each other's POSIX locks, and closing
    one deleted the WAL file of a live `mailwarden run`, losing its later commits for every
    other process.
    """
    schema = polars_schema()
    read_as = {c: (pl.String if c == "ts" else schema[c]) for c in DETECT_COLUMNS}
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    raw = store.read_engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(
            f"SELECT {', '.join(DETECT_COLUMNS)} FROM events WHERE ts >= ? AND ts <= ?"
            + (f" AND ({where})" if where else ""),
            (_utc(since).strftime(fmt), _utc(until).strftime(fmt)),
        )
        blocks = []
        while rows := cursor.fetchmany(200_000):
            blocks.append(pl.DataFrame(rows, schema=read_as, orient="row"))
        cursor.close()
    finally:
        raw.close()
    if not blocks:
        return pl.DataFrame(schema={c: schema[c] for c in DETECT_COLUMNS})
    frame = pl.concat(blocks, rechunk=True)
    return frame.with_columns(
        pl.col("ts").str.slice(0, 26).str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", time_zone="UTC", strict=False),
    )


def _pg_frame(store: Store, since: datetime, until: datetime, where: str | None = None) -> pl.DataFrame | None:
    import io

    from psycopg import sql

    cols = [sql.Identifier(c) for c in DETECT_COLUMNS if c != "ts"]
    query = sql.SQL(
        "COPY (SELECT (extract(epoch FROM ts) * 1000000)::bigint AS ts, {cols} FROM events "
        "WHERE ts >= {lo} AND ts <= {hi}{more}) TO STDOUT (FORMAT csv)"
    ).format(cols=sql.SQL(", ").join(cols), lo=sql.Literal(_utc(since)), hi=sql.Literal(_utc(until)),
             more=sql.SQL(f" AND ({where})" if where else ""))
    raw = store.read_engine.raw_connection()  # a replica when read_database_url is set
    try:
        buffer = io.BytesIO()
        with raw.driver_connection.cursor() as cur, cur.copy(query) as copy:
            for block in copy:
                buffer.write(block)
        raw.rollback()
    finally:
        raw.close()
    names = ["ts", *[c for c in DETECT_COLUMNS if c != "ts"]]
    schema = polars_schema()
    dtypes = {name: (pl.Int64 if name == "ts" else schema[name]) for name in names}
    if buffer.tell() == 0:
        frame = pl.DataFrame(schema=dtypes)
    else:
        buffer.seek(0)
        frame = pl.read_csv(buffer, has_header=False, new_columns=names, schema=dtypes)
    return frame.with_columns(pl.from_epoch(pl.col("ts"), time_unit="us").dt.replace_time_zone("UTC"))


def _to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    dtypes = pandas_dtypes()
    data = frame.drop("ts").to_pandas(use_pyarrow_extension_array=True)
    columns = {name: data[name].astype(dtypes[name]) for name in DETECT_COLUMNS if name != "ts"}
    # Through numpy: pandas converts an Arrow timestamp column one Python object at a time.
    naive = frame["ts"].dt.replace_time_zone(None).to_numpy()
    columns["ts"] = pd.Series(pd.DatetimeIndex(naive).tz_localize("UTC"), index=data.index).astype(dtypes["ts"])
    columns["origin"] = pd.Series(pd.NA, index=data.index, dtype=dtypes["origin"])
    return pd.DataFrame(columns, index=pd.RangeIndex(len(data)))[list(EVENT_COLUMNS)]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _pepper_if_needed(settings: Settings) -> bytes | None:
    # A raw key in an allowlist needs the pepper; otherwise don't create a pepper file just to detect.
    allow = settings.allowlist
    own = any(params.get("allow_keys") for params in settings.detectors.values() if isinstance(params, dict))
    return settings.resolved_pepper() if (allow.keys or own or settings.pepper) else None


def build_pack(store: Store, settings: Settings, only: set[str] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """The enabled detectors with the job's context (geo, revocation list, trained models) and the
    allowlist each applies."""
    from detectors.registry import DetectorContext, build_allowlists, build_detectors
    from pipeline.geo import Geo

    context = DetectorContext(geo=Geo.from_settings(settings), revoked=load_revoked(store))
    detectors = build_detectors(settings.detectors, context)
    if only is not None:
        from detectors.registry import DETECTORS

        unknown = sorted(set(only) - set(DETECTORS))
        if unknown:
            raise ConfigError(f"unknown detector(s) {', '.join(unknown)} (known: {', '.join(sorted(DETECTORS))})")
        detectors = [d for d in detectors if d.name in only]
    allowlists = build_allowlists(settings.allowlist, settings.detectors, _pepper_if_needed(settings))
    attach_models(store, detectors)
    return detectors, allowlists


def attach_models(store: Store, detectors: list[Any]) -> list[str]:
    """Give each model detector the state `mailwarden train` stored for it, when it was trained
    with the same features, feature shape, quantile and scikit-learn version. Returns their names."""
    import pickle

    from detectors.models import IsolationForestDetector

    models = [d for d in detectors if isinstance(d, IsolationForestDetector)]
    if not models:
        return []
    with store.engine.connect() as conn:
        rows = {r.name: r for r in conn.execute(sa.select(trained_models).where(trained_models.c.name.in_([d.name for d in models])))}
    if not rows:
        return []
    import sklearn  # only with a stored model: the import alone takes seconds

    attached = []
    for detector in models:
        row = rows.get(detector.name)
        if row is None:
            continue
        params = json.loads(row.params)
        if (
            row.sklearn_version != sklearn.__version__
            or tuple(json.loads(row.features)) != tuple(detector.features)
            or params.get("quantile") != detector.quantile
            or {k: params.get(k) for k in detector.shape} != detector.shape
        ):
            log.warning("model %s was trained with other settings or scikit-learn %s: run `mailwarden train`",
                        detector.name, row.sklearn_version)
            continue
        state = pickle.loads(row.state)  # our own table, written by train_once
        # The margin is applied at load time, so changing it needs no retraining.
        state.threshold = state.quantile_score + detector.margin
        detector.model_ = state
        attached.append(detector.name)
    return attached


def detect_range(
    store: Store,
    settings: Settings,
    since: datetime | None = None,
    until: datetime | None = None,
    step: timedelta = DETECT_STEP,
    only: set[str] | None = None,
    bounded: bool | None = None,
    chunk_rows: int | None = None,
) -> DetectSummary:
    """Run every enabled detector over [since, until] (default: the stored range), in steps.

    Each step ends at `now` = its end and gives each detector the step plus its own lookback, as a
    live tick would. Time comes from the data, never the clock, so replays give the alerts a live
    run would have. An alert found again (same detector, entity and window start) is updated, not
    duplicated: an ongoing attack extends one alert. `only` restricts the run to those detectors.

    `bounded` (default: the `detect_bounded` setting, else true on PostgreSQL only): a detector
    that describes a pushdown (detectors.pushdown) gets only the rows of its candidate entities,
    chosen per step by an aggregate in the database, so memory follows the suspicious traffic, not
    the raw events; the others get the whole frame as before. The alerts are the same either way
    (tests/integration/test_bounded_detect.py). Candidates of a `local` pushdown run in groups of
    at most `chunk_rows` rows (default CHUNK_ROWS).
    """
    started = time.perf_counter()
    stored = store.event_time_range()
    if stored is None:
        return DetectSummary(since, until)
    since, until = clip_range(since, until, stored)
    summary = DetectSummary(since, until)
    detectors, allowlists = build_pack(store, settings, only)
    if not detectors or since > until:
        return summary
    from detectors.registry import detect_allowed

    if bounded is None:
        bounded = settings.detect_bounded if settings.detect_bounded is not None else store.dialect == "postgresql"
    plans = {d.name: d.pushdown() for d in detectors} if bounded and store.dialect in ("sqlite", "postgresql") else {}
    whole = [d for d in detectors if plans.get(d.name) is None]
    pushed = [d for d in detectors if plans.get(d.name) is not None]
    found: dict[str, Alert] = {}
    if whole:
        summary.events = _detect_whole(store, whole, allowlists, since, until, step, summary, found)
    else:
        summary.events = _count_events(store, since, until)
    chunk_rows = chunk_rows or CHUNK_ROWS
    tables: dict[str, tuple[datetime, datetime, pd.DataFrame]] = {}
    for step_start, step_end in _steps(since, until, step) if pushed else ():
        first_events: dict[tuple[datetime, int], int | None] = {}  # per (lookback start, allowlist)
        for detector in pushed:
            plan = plans[detector.name]
            if plan.skip:
                continue
            allowlist = allowlists.get(detector.name)
            lo = step_start - detector.lookback
            known = (lo, id(allowlist))
            loaded = time.perf_counter()
            table = _step_table(store, plan, tables, detector.name, lo, step_end, min(step_start + LOAD_SPAN, until))
            for window in _candidate_frames(store, plan, lo, step_end, table, chunk_rows):
                if not window.empty and known not in first_events:
                    first_events[known] = _first_event_us(store, lo, step_end, allowlist)
                summary.load_seconds += time.perf_counter() - loaded
                if not window.empty and first_events[known] is not None:
                    ran = time.perf_counter()
                    with _frame_start(first_events[known]):
                        for alert in detect_allowed(detector, window, step_end, allowlist):
                            found[alert.alert_id] = alert
                    summary.seconds_by_detector[detector.name] += time.perf_counter() - ran
                del window
                loaded = time.perf_counter()
            summary.load_seconds += time.perf_counter() - loaded
    summary.alerts = merge_with_stored(store, merge_overlapping(list(found.values())))
    summary.alerts_found = len(summary.alerts)
    summary.by_detector.update(a.detector for a in summary.alerts)
    summary.alerts_new, summary.alerts_updated = store.upsert_alerts(summary.alerts)
    summary.seconds = time.perf_counter() - started
    return summary


def _detect_whole(
    store: Store, detectors: list[Any], allowlists: dict[str, Any], since: datetime, until: datetime,
    step: timedelta, summary: DetectSummary, found: dict[str, Alert],
) -> int:
    """The detectors that read the whole frame: loaded in LOAD_SPAN pieces, run in steps. Returns
    the number of events in [since, until]."""
    from detectors.features import micros
    from detectors.registry import detect_allowed

    max_lookback = max(d.lookback for d in detectors)
    events = 0
    for load_start, load_end in _steps(since, until, LOAD_SPAN):
        loaded = time.perf_counter()
        frame = load_frame(store, load_start - max_lookback, load_end)
        summary.load_seconds += time.perf_counter() - loaded
        if frame.empty:
            continue
        stamps = micros(frame["ts"])
        for step_start, step_end in _steps(load_start, load_end, step):
            first = _position(stamps, step_start, "left")
            last = _position(stamps, step_end, "right")
            events += last - first if step_start == load_start else last - _position(stamps, step_start, "right")
            for detector in detectors:
                # Each detector sees the step plus its own lookback before it.
                window = frame.iloc[_position(stamps, step_start - detector.lookback, "left"):last]
                ran = time.perf_counter()
                for alert in detect_allowed(detector, window.reset_index(drop=True), step_end, allowlists.get(detector.name)):
                    found[alert.alert_id] = alert
                summary.seconds_by_detector[detector.name] += time.perf_counter() - ran
    return events


# Candidate entities per load query: keeps each statement's text (values are inlined) small.
CANDIDATE_CHUNK = 5_000
# Rows one group of candidates of a `local` pushdown brings into memory at most (unless a single
# entity has more): about 0.5 GB as the detectors' frame.
CHUNK_ROWS = 1_000_000


def _step_table(
    store: Store, plan: Any, tables: dict[str, tuple[datetime, datetime, pd.DataFrame]], name: str,
    since: datetime, until: datetime, ahead: datetime,
) -> pd.DataFrame | None:
    """A pushdown's aggregate for the step [since, until]. Bucketed ones are computed once up to
    `ahead` and cut per step (buckets overlapping the step: the edge buckets count a little more
    than the step holds, which only adds candidates). When the first bucket also holds rows from
    before the step, `attrs["since"]` says where the step begins."""
    from pipeline.aggregates import pushdown_table

    if plan.by is None:
        return None
    if plan.bucket is None or plan.per is not None:
        return pushdown_table(store.read_engine, since, until, plan)
    cached = tables.get(name)
    if cached is None or cached[1] < until:
        cached = (since, max(ahead, until), pushdown_table(store.read_engine, since, max(ahead, until), plan))
        tables[name] = cached
    computed_from, _, whole = cached
    width = whole.attrs["bucket_seconds"]
    lo, hi = _epoch_us(since) / 1e6, _epoch_us(until) / 1e6
    bucket = whole["bucket"].to_numpy()
    table = whole[(bucket + width > lo) & (bucket <= hi)]
    table.attrs = dict(whole.attrs)
    if computed_from < since:
        table.attrs["since"] = lo
    return table


def _epoch_us(at: datetime) -> int:
    """Whole microseconds since the epoch (how the detectors' frames hold times)."""
    return (_utc(at) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def _candidate_frames(
    store: Store, plan: Any, since: datetime, until: datetime, table: pd.DataFrame | None, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """The rows a pushed-down detector needs over [since, until]: its `rows`, and every row of the
    entities its `pick` chose from the database's aggregate (`table`, else computed here). One frame,
    or for a `local` pushdown one per group of candidates holding at most `chunk_rows` rows."""
    from pipeline.aggregates import entity_column, pushdown_table, rows_condition

    own = sa.or_(*[rows_condition(r) for r in plan.rows]) if plan.rows else None
    chosen: list[Any] = []
    if plan.by is not None:
        if table is None:
            table = pushdown_table(store.read_engine, since, until, plan)
        chosen = sorted(plan.pick(table), key=str)
    if own is None and not chosen:
        return
    entity = entity_column(plan.by) if plan.by is not None else None
    if plan.local and own is None and len(chosen) > 1:
        for group in _groups(store, entity, chosen, since, until, chunk_rows):
            yield load_frame(store, since, until, where=entity.in_(group))
        return
    chunks = [chosen[i:i + CANDIDATE_CHUNK] for i in range(0, len(chosen), CANDIDATE_CHUNK)]
    parts: list[Any] = [own] if own is not None else []
    for chunk in chunks:
        # Every row once: a row of the detector's own `rows` is loaded by that part only.
        part = entity.in_(chunk)
        parts.append(part if own is None else sa.and_(part, sa.not_(own)))
    yield load_frame(store, since, until, where=parts)


def _groups(
    store: Store, entity: Any, chosen: list[Any], since: datetime, until: datetime, chunk_rows: int
) -> Iterator[list[Any]]:
    """The candidates in groups of at most `chunk_rows` rows (an entity with more rows alone) and
    CANDIDATE_CHUNK entities, from their row counts in the database."""
    from pipeline.store import events as events_table

    rows: dict[Any, int] = {}
    with store.read_engine.connect() as conn:
        for i in range(0, len(chosen), CANDIDATE_CHUNK):
            query = (sa.select(entity, sa.func.count())
                     .where(events_table.c.ts >= _utc(since), events_table.c.ts <= _utc(until),
                            entity.in_(chosen[i:i + CANDIDATE_CHUNK]))
                     .group_by(entity))
            rows.update((value, int(n)) for value, n in conn.execute(query))
    group: list[Any] = []
    held = 0
    for value in chosen:
        n = rows.get(value, 0)
        if group and (held + n > chunk_rows or len(group) >= CANDIDATE_CHUNK):
            yield group
            group, held = [], 0
        group.append(value)
        held += n
    if group:
        yield group


def _first_event_us(store: Store, since: datetime, until: datetime, allowlist: Any) -> int | None:
    """Time (µs) of the first event in [since, until] the detector would have been given whole (the
    allowlisted ones are dropped before it sees them); None when there is none."""
    from pipeline.store import events as events_table

    columns = [events_table.c.ts, events_table.c.source_ip, events_table.c.api_key_id, events_table.c.account]
    query = (sa.select(*columns).where(events_table.c.ts >= _utc(since), events_table.c.ts <= _utc(until))
             .order_by(events_table.c.ts, events_table.c.event_id))
    batch, offset = 1, 0
    with store.read_engine.connect() as conn:
        while True:
            rows = conn.execute(query.limit(batch).offset(offset)).all()
            if not rows:
                return None
            frame = pd.DataFrame(rows, columns=["ts", "source_ip", "api_key_id", "account"])
            keep = np.ones(len(frame), dtype=bool)
            if allowlist is not None and not allowlist.empty:
                typed = frame.astype({c: "string" for c in ("source_ip", "api_key_id", "account")})
                keep = ~np.asarray(allowlist.event_mask(typed), dtype=bool)
            if keep.any():
                first = _aware(frame["ts"].iloc[int(np.flatnonzero(keep)[0])])
                return _epoch_us(first)
            offset += batch
            batch = min(batch * 10, 100_000)


@contextmanager
def _frame_start(first_us: int) -> Iterator[None]:
    """Tell the detector (detectors.base.FRAME_START_US) where its whole frame would have begun."""
    from detectors.base import FRAME_START_US

    token = FRAME_START_US.set(first_us)
    try:
        yield
    finally:
        FRAME_START_US.reset(token)


def _count_events(store: Store, since: datetime, until: datetime) -> int:
    from pipeline.store import events as events_table

    query = sa.select(sa.func.count()).select_from(events_table).where(
        events_table.c.ts >= _utc(since), events_table.c.ts <= _utc(until))
    with store.read_engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _same_episode_key(alert: Alert) -> tuple[str, str, str]:
    return alert.detector, str(alert.entity_kind), alert.entity


def _joined(first: Alert, second: Alert) -> Alert:
    """One alert for two overlapping findings about the same entity: the earliest start (the id),
    the latest end, the highest score, and the text of the finding that saw more."""
    newer = second if second.window_end >= first.window_end else first
    return dataclasses.replace(
        newer,
        window_start=min(first.window_start, second.window_start),
        window_end=max(first.window_end, second.window_end),
        score=max(first.score, second.score),
        severity=max(first.severity, second.severity),
    )


def merge_overlapping(alerts: list[Alert]) -> list[Alert]:
    """Alerts of one detector about one entity whose windows overlap become one.

    A detector reports an episode from what its frame shows; a run that sees an ongoing attack from
    part-way through may place its start later than the run that saw it begin. Joining overlapping
    windows keeps one alert per attack, whichever runs saw it.
    """
    merged: list[Alert] = []
    for alert in sorted(alerts, key=lambda a: (*_same_episode_key(a), a.window_start, a.window_end)):
        last = merged[-1] if merged else None
        if last is not None and _same_episode_key(last) == _same_episode_key(alert) and alert.window_start <= last.window_end:
            merged[-1] = _joined(last, alert)
        else:
            merged.append(alert)
    return sorted(merged, key=lambda a: (a.window_start, a.detector, a.entity))


def merge_with_stored(store: Store, found: list[Alert]) -> list[Alert]:
    """Extend stored alerts instead of adding overlapping ones: a finding that overlaps a stored
    alert of the same detector and entity takes its start (so its id, and its status), or, when it
    starts earlier, replaces it (the stored row is removed, its status carried over)."""
    from pipeline.store import alerts as alerts_table

    if not found:
        return found
    lo = min(a.window_start for a in found)
    hi = max(a.window_end for a in found)
    query = sa.select(alerts_table).where(
        alerts_table.c.detector.in_(sorted({a.detector for a in found})),
        alerts_table.c.window_end >= lo,
        alerts_table.c.window_start <= hi,
    )
    with store.engine.connect() as conn:
        stored = [dict(r._mapping) for r in conn.execute(query)]
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in stored:
        row["window_start"], row["window_end"] = _aware(row["window_start"]), _aware(row["window_end"])
        by_key.setdefault((row["detector"], row["entity_kind"], row["entity"]), []).append(row)
    result, stale = [], []
    for alert in found:
        for row in by_key.get(_same_episode_key(alert), []):
            if row["window_start"] <= alert.window_end and alert.window_start <= row["window_end"]:
                old = Alert(
                    detector=row["detector"], severity=Severity(row["severity"]), entity_kind=alert.entity_kind,
                    entity=row["entity"], window_start=row["window_start"], window_end=row["window_end"],
                    score=row["score"], title=row["title"], evidence={}, mitre=row["mitre"],
                )
                joined = _joined(old, alert)
                alert = dataclasses.replace(joined, title=alert.title, evidence=alert.evidence,
                                            status=AlertStatus(row["status"]))
                if joined.alert_id != row["alert_id"]:
                    stale.append(row["alert_id"])
        result.append(alert)
    if stale:
        with store.engine.begin() as conn:
            conn.execute(alerts_table.delete().where(alerts_table.c.alert_id.in_(stale)))
    return result


def _position(stamps: Any, at: datetime, side: str) -> int:
    at_us = _epoch_us(at)
    return int(np.searchsorted(stamps, at_us, side))


def detect_once(store: Store, settings: Settings, now: datetime | None = None) -> DetectSummary:
    """One scheduled detect tick: from the watermark to the newest stored event (or `now`).

    Data time, not the clock, bounds the run, so a lagging source or a restart after downtime
    catches up over everything it missed, and each detector still sees its lookback before it.
    """
    stored = store.event_time_range()
    if stored is None:
        return DetectSummary(None, None)
    until = stored[1] if now is None else min(now, stored[1])
    watermark = store.get_watermark("detect")
    since = watermark or max(stored[0], until - timedelta(hours=settings.schedule.initial_lookback_hours))
    if watermark is not None and since >= until:
        return DetectSummary(since, until)
    summary = detect_range(store, settings, since, until)
    store.set_watermark("detect", until)
    return summary


@dataclass
class TrainResult:
    name: str
    rows: int
    trained_from: str | None
    trained_to: str | None
    excluded_alerts: int
    threshold: float | None
    seconds: float


def train_once(
    store: Store,
    settings: Settings,
    since: datetime | None = None,
    until: datetime | None = None,
    days: float = 14.0,
) -> list[TrainResult]:
    """Fit every enabled model detector on [since, until] (default: the last `days` stored) and
    store it with its feature list and scikit-learn version.

    The windows already alerted on (by any detector, whatever their status) are left out of the
    entities they name, so an attack seen before is not learned as normal.
    """
    import pickle

    import sklearn

    from detectors.models import IsolationForestDetector
    from detectors.registry import DetectorContext, build_detectors
    from pipeline.geo import Geo

    stored = store.event_time_range()
    if stored is None:
        return []
    until = until or stored[1]
    since = since or max(stored[0], until - timedelta(days=days))
    models = [d for d in build_detectors(settings.detectors, DetectorContext(geo=Geo.from_settings(settings)))
              if isinstance(d, IsolationForestDetector)]
    if not models:
        return []
    frame = load_frame(store, since, until)
    exclude = [
        (row["entity"], (row["window_start"], row["window_end"]))
        for row in store.list_alerts(limit=1_000_000)
        if row["window_end"] >= since and row["window_start"] <= until
    ]
    results = []
    now = datetime.now(timezone.utc)
    for model in models:
        started = time.perf_counter()
        model.fit(frame, exclude=exclude)
        state = model.model_
        if state is not None:
            row = {
                "name": model.name,
                "features": json.dumps(list(state.features)),
                "params": json.dumps({**model.params(), **model.shape}, sort_keys=True),
                "sklearn_version": sklearn.__version__,
                "rows": state.rows,
                "trained_from": _aware(state.trained_from) if state.trained_from else None,
                "trained_to": _aware(state.trained_to) if state.trained_to else None,
                "trained_at": now,
                "state": pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
            }
            with store.engine.begin() as conn:
                conn.execute(trained_models.delete().where(trained_models.c.name == model.name))
                conn.execute(trained_models.insert().values(**row))
        results.append(
            TrainResult(
                model.name, state.rows if state else 0, state.trained_from if state else None,
                state.trained_to if state else None, len(exclude),
                state.threshold if state else None, time.perf_counter() - started,
            )
        )
    return results


__all__ = [
    "detect_once",
    "train_once",
    "load_frame",
    "revoke_keys",
    "load_revoked",
    "IngestSummary",
    "DetectSummary",
    "ingest_paths",
    "follow_paths",
    "detect_range",
    "prepare_batch",
    "event_ids",
]
